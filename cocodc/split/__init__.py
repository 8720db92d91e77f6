"""The split-learning mode's plain parts: who owns which parameters, batch regulation, timing."""
