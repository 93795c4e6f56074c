"""tensorps: a networked parameter server with TensorFlow's exact Assign semantics."""
