//! The status report `sluice status` prints: what the admin socket answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub steering: String,
    pub listen: Vec<String>,
    pub pools: Vec<PoolStatus>,
    /// Connections the steering program sent to the dispatcher, by reason.
    pub fallbacks: BTreeMap<String, u64>,
    pub dispatcher: DispatcherStatus,
    pub kernel: KernelStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub workers: Vec<WorkerStatus>,
    /// Connections waiting in the pool's accept queues now.
    pub queued: u64,
    /// Connections the kernel program steered to this pool.
    pub steered_kernel: u64,
    /// Connections the dispatcher handed to this pool.
    pub handed_off: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub uptime_s: u64,
    pub restarts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DispatcherStatus {
    /// Connections accepted on the dispatcher sockets.
    pub accepted: u64,
    /// Requests refused, by status code.
    pub refused: BTreeMap<String, u64>,
    pub header_timeouts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelStatus {
    /// Runs of the steering program.
    pub program_runs: u64,
    /// First-segment mode: data-less SYNs answered by cookie (steered later on their data).
    pub syn_cookies: u64,
    /// First-segment mode: handshake ACKs dropped by the ack gate.
    pub ack_gate_drops: u64,
}

impl Status {
    /// The human-readable form of `sluice status`.
    pub fn render(&self) -> String {
        let mut out = format!("steering: {}   listen: {}\n", self.steering, self.listen.join(", "));
        out.push_str(&format!(
            "{:<16} {:>8} {:>8} {:>14} {:>11}  workers (pid/uptime/restarts)\n",
            "pool", "queued", "", "steered_kernel", "handed_off"
        ));
        for p in &self.pools {
            let workers: Vec<String> =
                p.workers.iter().map(|w| format!("{}/{}s/{}", w.pid, w.uptime_s, w.restarts)).collect();
            out.push_str(&format!(
                "{:<16} {:>8} {:>8} {:>14} {:>11}  {}\n",
                p.name,
                p.queued,
                "",
                p.steered_kernel,
                p.handed_off,
                if workers.is_empty() { "-".to_owned() } else { workers.join(" ") }
            ));
        }
        let fallbacks: Vec<String> = self.fallbacks.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("dispatcher fallbacks: {}\n", fallbacks.join(" ")));
        let refused: Vec<String> = self.dispatcher.refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "dispatcher: accepted={} refused: {} header_timeouts={}\n",
            self.dispatcher.accepted,
            refused.join(" "),
            self.dispatcher.header_timeouts
        ));
        out.push_str(&format!(
            "kernel: program_runs={} syn_cookies={} ack_gate_drops={}\n",
            self.kernel.program_runs, self.kernel.syn_cookies, self.kernel.ack_gate_drops
        ));
        out
    }
}
