"""genlab's configs, shipped inside the package as genlab.configs (see pyproject.toml): the YAML files only."""
