"""The reference PyTorch models' checkpoints: the key and layout mapping (`torch_mapping`), standalone weights
checkpoints (`weights`), and the converter between the two (`convert`)."""
