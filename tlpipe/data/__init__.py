"""Images and the image store: decoding, the store format, the ingest stage."""
