//! Reading a `shoal worker` process's start: its ticket and node id.

use std::io::{BufRead, BufReader, Lines};
use std::process::ChildStdout;

/// Reads a worker's stdout up to its `ready: node ID` line: its ticket (`ticket: ...`), its
/// id, and the lines that follow (to keep reading, so the worker never blocks on a full pipe).
pub fn read_ready(stdout: ChildStdout) -> (String, String, Lines<BufReader<ChildStdout>>) {
    let mut lines = BufReader::new(stdout).lines();
    let (mut ticket, mut id) = (None, None);
    for line in lines.by_ref() {
        let line = line.expect("worker stdout");
        if let Some(t) = line.strip_prefix("ticket: ") {
            ticket = Some(t.to_owned());
        }
        if let Some(rest) = line.strip_prefix("ready: node ") {
            id = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    (ticket.expect("a ticket before ready"), id.expect("the worker prints ready"), lines)
}
