"""The training step: state, loss and gradients, the optimizer, and the compiled step's memory."""
