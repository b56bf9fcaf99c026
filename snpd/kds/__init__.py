"""AMD Key Distribution Service: URLs, an HTTP client with retries, a verified cache."""
