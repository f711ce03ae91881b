"""Per-conversation state: the session core, its timeline and the session store."""
