//! HTTP client of the Task Group API: auth, retries with backoff, chunked add-runs with
//! reconciliation, and SSE streams that resume from the last `event_id`.
