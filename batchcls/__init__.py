"""batchcls: classify whole folders of images with a trained model bundle."""

__version__ = "0.1.0"
