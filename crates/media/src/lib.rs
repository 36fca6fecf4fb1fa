//! Archive media: container/object layout, backends, I/O scheduler and media model.
