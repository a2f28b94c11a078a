"""The driver's exit codes that fail its Job at once (the chart's driver podFailurePolicy lists them)."""

# Retrying the driver cannot help after these; any other failure (an unexpected exception exits 1) is retried
# up to driver.backoffLimit.
EXIT_STAGE_FAILED = 10
EXIT_NOT_READY = 11  # preflight, or the run belongs to someone else, or its pipeline changed
