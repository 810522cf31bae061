"""The worker process host shared by prefill and decode workers: server lifecycle, registration, settings, metrics."""
