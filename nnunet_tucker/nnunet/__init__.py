"""The nnU-Net runtime integration: what runs inside a user's prediction. The start-up hook, the predictor,
the weights cache, compressed model folders and their network class, calibration images, and the faster
pipeline around the network."""
