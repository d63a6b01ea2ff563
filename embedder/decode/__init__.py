"""Image bytes to normalised tensors: PIL and torchvision on CPU, nvJPEG on GPU, the decode pool."""
