"""The sampling engine: sigma-space denoisers with guidance, and safety filters."""
