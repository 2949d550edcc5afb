"""Configuration files to specs: YAML/JSON reading with line numbers, site files to `Site`,
QuantumServerless configurations to validated provider entries. Builds no provider."""
