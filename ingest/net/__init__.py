"""Wire protocol (sans-IO codec), endpoints and the client SDK."""
