"""What each Keras backend needs of its own: a small file per backend, as Keras's own
keras/src/backend/{tensorflow,jax}/ are. Everything else of sparta_tf is written once."""
