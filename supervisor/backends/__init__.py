"""How an attempt is started, watched and stopped: one small interface, one implementation per Ray mode."""
