"""The plugin system: the registry of every plugin kind, the hooks, plugin options and the
protocols each kind implements."""
