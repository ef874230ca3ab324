//! Maglev consistent hashing (placeholder; being written).
