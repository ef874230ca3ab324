//! Socket destruction (placeholder; being written).
