"""LoRA variants beyond the plain branch: initialisations from W (PiSSA, OLoRA) and their export."""
