"""``sidewatch demo``: a model server, a sidecar and a client streaming MNIST, with a live display.

``run``      starts the processes, sends benign traffic, then drift, then an attack, and shows what happens
``display``  the terminal display
``data``     the bundled MNIST samples (reference, benign stream, test sample, adversarial examples)
``models/``  the bundled model repository (mnist_cnn versions 1 and 2, calibrated)
"""
