"""Images: references, the content-addressed store, layer unpacking and squashfs conversion."""
