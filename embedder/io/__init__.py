"""Where images and stores live: sources, local and object storage, file locks."""
