"""Developer tools: a local cluster (`baton up`) and offline fixture models."""
