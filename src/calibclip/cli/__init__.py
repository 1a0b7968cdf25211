"""Command-line interface (`calibclip ...`)."""
