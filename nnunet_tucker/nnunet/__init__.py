"""Everything that knows nnU-Net: the predictor, the start-up hook, model folders, the weights cache."""
