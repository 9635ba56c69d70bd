"""Real time: sessions, polling, the streamer's ticks turned into bars, and the series they extend."""
