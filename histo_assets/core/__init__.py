"""Framework-free imaging and ML code; everything here can be used and tested without Dagster."""
