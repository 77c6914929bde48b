//! The scripted timeline's phases and the log of what the lab announced.

/// Phase start times (seconds) for a timeline of `total` seconds.
pub struct Timeline {
    pub learning: u64,
    pub monitor: u64,
    pub enforce: u64,
    pub attack: u64,
}

impl Timeline {
    pub fn new(total: u64) -> Timeline {
        let learning = total * 3 / 10;
        Timeline { learning, monitor: learning + 4, enforce: total * 55 / 100, attack: total * 3 / 4 }
    }
}

/// What the live view and the summary show of the lab's progress.
#[derive(Default)]
pub struct Log {
    pub phase: String,
    pub lines: Vec<String>,
}

impl Log {
    pub fn say(&mut self, quiet: bool, msg: String) {
        if !quiet {
            eprintln!("lab: {msg}");
        }
        self.lines.push(msg);
    }
}
