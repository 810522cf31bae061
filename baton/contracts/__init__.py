"""What crosses a process boundary through Redis: keys, the worker record, KV events, signals, spillover, the block hash."""
