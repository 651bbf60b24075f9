//! Ctrl-C, seen the moment it arrives.
//!
//! tokio learns of a signal only when its driver next runs. Until then the tasks already
//! running carry on, and on a busy machine a submission can send several more add-runs
//! POSTs after the user pressed Ctrl-C. [`watch`] has the operating system's signal handler
//! itself set a flag, and the client looks at [`requested`] before every add-runs POST, so
//! none starts once the signal has arrived. Only `groupflow run` watches; a library user
//! who never calls [`watch`] sees no change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on, for the life of the process, SIGINT sets the flag [`requested`] reads.
/// Calling it again does nothing more.
pub fn watch() -> std::io::Result<()> {
    if FLAG.get().is_some() {
        return Ok(());
    }
    let flag = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())?;
    let _ = FLAG.set(flag);
    Ok(())
}

/// True once SIGINT arrived after [`watch`].
pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}
