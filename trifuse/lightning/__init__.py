"""Lightning code (DataModules, modules, callbacks): the only place that imports lightning."""
