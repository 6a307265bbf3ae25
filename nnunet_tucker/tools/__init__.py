"""Tools around the compression, for people rather than for a prediction run: the safety check (`evaluate`),
the demo, side-by-side benchmarks, the built-in architectures, synthetic CT phantoms and the demo model."""
