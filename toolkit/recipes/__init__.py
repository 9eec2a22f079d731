"""The embedded default's recipes: the colored-digits dataset, training the generator and
the CNN classifiers, and their commands. The core never imports this package."""
