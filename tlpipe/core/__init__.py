"""The ground floor: params and task resolution, errors, project paths, model names, data sources."""
