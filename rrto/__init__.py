"""What ``%load_ext rrto`` loads. It only hands on to :mod:`rrto_lab`."""
