"""The federated mode's algorithms: plain tensor code, no processes."""
