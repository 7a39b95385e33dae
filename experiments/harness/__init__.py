"""The run record: results, run keys, tracking, anomaly maps and the Hydra-side helpers the entry points share."""
