//! client (todo)
