"""Fine-tuning a backbone on the user's labels: options, data, schedule, time budget, training, resume."""
