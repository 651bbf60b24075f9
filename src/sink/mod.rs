//! Rows to run inputs (input mapping, row keys) and their batched submission.
