"""distml: train CIFAR-10 classifiers on one or many GPUs, study and compress them with the
Separation Index."""

__version__ = "0.1.0"
