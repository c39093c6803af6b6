"""HTTP edge and command line of logitspec."""
