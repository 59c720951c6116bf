"""Flow control: the gates a call passes (scheduler, circuit breakers, ...) and their actors."""
