//! The GPU series in the Prometheus text format, written from the cached
//! view (a scrape never calls the backend). docs/metrics.md lists every
//! family with its dcgm-exporter counterpart; [`FAMILIES`] is the list a
//! test holds the document to.

use std::fmt::Write as _;
use std::time::SystemTime;

use ccnode_gpu::{GpuInfo, SampleStatus, Telemetry, THROTTLE_REASONS};

use super::GpuMonitor;

/// Every GPU family: name, type, help, and the dcgm-exporter field it
/// corresponds to ("" where dcgm-exporter has none).
pub const FAMILIES: &[(&str, &str, &str, &str)] = &[
    ("ccnode_gpu_backend_info", "gauge", "The GPU backend in use (nvml or sim); always 1.", ""),
    ("ccnode_gpu_simulated", "gauge", "1 when the GPUs are SIMULATED (backend sim), 0 for real ones.", ""),
    ("ccnode_gpu_devices", "gauge", "GPUs in the inventory.", ""),
    ("ccnode_gpu_info", "gauge", "One series per GPU carrying its versions and modes; always 1.", "DCGM_FI_DRIVER_VERSION, DCGM_FI_DEV_VBIOS_VERSION, DCGM_FI_DEV_INFOROM_IMAGE_VER"),
    ("ccnode_gpu_memory_total_bytes", "gauge", "Framebuffer size.", "DCGM_FI_DEV_FB_TOTAL"),
    ("ccnode_gpu_temperature_celsius", "gauge", "GPU temperature.", "DCGM_FI_DEV_GPU_TEMP"),
    ("ccnode_gpu_memory_temperature_celsius", "gauge", "Memory (HBM) temperature.", "DCGM_FI_DEV_MEMORY_TEMP"),
    ("ccnode_gpu_power_watts", "gauge", "Power draw.", "DCGM_FI_DEV_POWER_USAGE"),
    ("ccnode_gpu_energy_joules_total", "counter", "Energy used since the driver was loaded.", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION (mJ)"),
    ("ccnode_gpu_sm_clock_hertz", "gauge", "SM clock.", "DCGM_FI_DEV_SM_CLOCK (MHz)"),
    ("ccnode_gpu_memory_clock_hertz", "gauge", "Memory clock.", "DCGM_FI_DEV_MEM_CLOCK (MHz)"),
    ("ccnode_gpu_utilization_ratio", "gauge", "Fraction of the last sample period a kernel was running.", "DCGM_FI_DEV_GPU_UTIL (%)"),
    ("ccnode_gpu_memory_utilization_ratio", "gauge", "Fraction of the last sample period memory was read or written.", "DCGM_FI_DEV_MEM_COPY_UTIL (%)"),
    ("ccnode_gpu_framebuffer_bytes", "gauge", "Framebuffer memory by state (used, free, reserved).", "DCGM_FI_DEV_FB_USED, DCGM_FI_DEV_FB_FREE, DCGM_FI_DEV_FB_RESERVED (MiB)"),
    ("ccnode_gpu_ecc_errors_total", "counter", "ECC errors since the driver was loaded, by type (corrected, uncorrected).", "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL, DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"),
    ("ccnode_gpu_retired_pages", "gauge", "Pages retired for ECC errors, by cause (single_bit, double_bit).", "DCGM_FI_DEV_RETIRED_SBE, DCGM_FI_DEV_RETIRED_DBE"),
    ("ccnode_gpu_retired_pages_pending", "gauge", "1 if a page retirement waits for a reboot.", "DCGM_FI_DEV_RETIRED_PENDING"),
    ("ccnode_gpu_remapped_rows", "gauge", "Rows remapped, by kind (correctable, uncorrectable).", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS, DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"),
    ("ccnode_gpu_row_remap_pending", "gauge", "1 if a row remap waits for a GPU reset.", "DCGM_FI_DEV_ROW_REMAP_PENDING"),
    ("ccnode_gpu_row_remap_failure", "gauge", "1 if a row remap failed (the GPU needs service).", "DCGM_FI_DEV_ROW_REMAP_FAILURE"),
    ("ccnode_gpu_pcie_replays_total", "counter", "PCIe replays.", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER"),
    ("ccnode_gpu_throttle_reasons", "gauge", "NVML's clocks-event (throttle) reason bitmask.", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"),
    ("ccnode_gpu_throttled", "gauge", "1 for each throttle reason in effect, by reason.", ""),
    ("ccnode_gpu_pstate", "gauge", "Performance state (0 fastest, 15 slowest).", "DCGM_FI_DEV_PSTATE"),
    ("ccnode_gpu_mig_info", "gauge", "One series per MIG device; always 1.", ""),
    ("ccnode_gpu_mig_framebuffer_bytes", "gauge", "MIG device memory by state (used, total).", "DCGM_FI_DEV_FB_USED, DCGM_FI_DEV_FB_TOTAL (per MIG device)"),
    ("ccnode_gpu_xid_errors_total", "counter", "XID events since ccnoded started, by XID.", ""),
    ("ccnode_gpu_last_xid", "gauge", "The last XID seen since ccnoded started.", "DCGM_FI_DEV_XID_ERRORS"),
    ("ccnode_gpu_last_xid_timestamp_seconds", "gauge", "Unix time of the last XID.", ""),
    ("ccnode_gpu_lost", "gauge", "1 if the GPU has fallen off the bus.", ""),
    ("ccnode_gpu_health", "gauge", "1 if the GPU is healthy; 0 if lost, after a critical XID, or past the ECC threshold.", ""),
    ("ccnode_gpu_drift", "gauge", "1 per field that differs from the pinned baseline, with the expected and found values and the policy action.", ""),
    ("ccnode_gpu_drift_fields", "gauge", "Fields that differ from the baseline.", ""),
    ("ccnode_gpu_workers_blocked", "gauge", "1 while drift or GPU health keeps new workers from starting.", ""),
    ("ccnode_gpu_polls_total", "counter", "GPU polls, by result (ok, error).", ""),
    ("ccnode_gpu_poll_seconds_total", "counter", "Time spent polling GPUs.", ""),
    ("ccnode_gpu_last_poll_duration_seconds", "gauge", "How long the last poll took.", ""),
    ("ccnode_gpu_last_poll_timestamp_seconds", "gauge", "Unix time of the last successful poll.", ""),
    ("ccnode_gpu_events_total", "counter", "GPU events received, by type (xid, ecc_corrected, ecc_uncorrected, lost).", ""),
    ("ccnode_gpu_event_errors_total", "counter", "Failed waits for GPU events.", ""),
];

fn family<'a>(name: &str) -> &'a (&'static str, &'static str, &'static str, &'static str) {
    FAMILIES
        .iter()
        .find(|f| f.0 == name)
        .expect("every rendered family is listed in FAMILIES")
}

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Out {
    s: String,
}

impl Out {
    fn header(&mut self, name: &str) {
        let (n, kind, help, _) = family(name);
        let _ = writeln!(self.s, "# HELP {n} {help}\n# TYPE {n} {kind}");
    }

    fn line(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.s, "{name} {value}");
        } else {
            let _ = writeln!(self.s, "{name}{{{labels}}} {value}");
        }
    }
}

fn base_labels(g: &GpuInfo) -> String {
    format!(
        "gpu=\"{}\",uuid=\"{}\",pci_bus_id=\"{}\",model=\"{}\"",
        g.index,
        esc(&g.uuid),
        esc(&g.pci_bus_id),
        esc(&g.name)
    )
}

type Getter = fn(&Telemetry) -> Option<f64>;

/// Per-GPU single-valued telemetry families.
const SIMPLE: &[(&str, Getter)] = &[
    ("ccnode_gpu_temperature_celsius", |t| t.gpu_temp_celsius),
    ("ccnode_gpu_memory_temperature_celsius", |t| {
        t.memory_temp_celsius
    }),
    ("ccnode_gpu_power_watts", |t| t.power_watts),
    ("ccnode_gpu_energy_joules_total", |t| t.energy_joules),
    ("ccnode_gpu_sm_clock_hertz", |t| {
        t.sm_clock_mhz.map(|m| f64::from(m) * 1e6)
    }),
    ("ccnode_gpu_memory_clock_hertz", |t| {
        t.memory_clock_mhz.map(|m| f64::from(m) * 1e6)
    }),
    ("ccnode_gpu_utilization_ratio", |t| t.gpu_utilization),
    ("ccnode_gpu_memory_utilization_ratio", |t| {
        t.memory_utilization
    }),
    ("ccnode_gpu_retired_pages_pending", |t| {
        t.retired_pages.map(|r| f64::from(u8::from(r.pending)))
    }),
    ("ccnode_gpu_row_remap_pending", |t| {
        t.remapped_rows.map(|r| f64::from(u8::from(r.pending)))
    }),
    ("ccnode_gpu_row_remap_failure", |t| {
        t.remapped_rows.map(|r| f64::from(u8::from(r.failure)))
    }),
    ("ccnode_gpu_pcie_replays_total", |t| {
        t.pcie_replays_total.map(|v| v as f64)
    }),
    ("ccnode_gpu_throttle_reasons", |t| {
        t.throttle_reasons.map(|v| v as f64)
    }),
    ("ccnode_gpu_pstate", |t| t.pstate.map(f64::from)),
];

type MultiGetter = fn(&Telemetry) -> Vec<(&'static str, Option<f64>)>;

/// Per-GPU families with one extra label.
const MULTI: &[(&str, &str, MultiGetter)] = &[
    ("ccnode_gpu_framebuffer_bytes", "state", |t| {
        vec![
            ("used", t.fb_used_bytes.map(|v| v as f64)),
            ("free", t.fb_free_bytes.map(|v| v as f64)),
            ("reserved", t.fb_reserved_bytes.map(|v| v as f64)),
        ]
    }),
    ("ccnode_gpu_ecc_errors_total", "type", |t| {
        vec![
            ("corrected", t.ecc_corrected_total.map(|v| v as f64)),
            ("uncorrected", t.ecc_uncorrected_total.map(|v| v as f64)),
        ]
    }),
    ("ccnode_gpu_retired_pages", "cause", |t| {
        vec![
            ("single_bit", t.retired_pages.map(|r| r.single_bit as f64)),
            ("double_bit", t.retired_pages.map(|r| r.double_bit as f64)),
        ]
    }),
    ("ccnode_gpu_remapped_rows", "kind", |t| {
        vec![
            ("correctable", t.remapped_rows.map(|r| r.correctable as f64)),
            (
                "uncorrectable",
                t.remapped_rows.map(|r| r.uncorrectable as f64),
            ),
        ]
    }),
    ("ccnode_gpu_throttled", "reason", |t| {
        THROTTLE_REASONS
            .iter()
            .map(|(bit, name)| {
                (
                    *name,
                    t.throttle_reasons
                        .map(|r| f64::from(u8::from(r & bit != 0))),
                )
            })
            .collect()
    }),
];

impl GpuMonitor {
    /// Appends every GPU series to `out`.
    pub fn render_into(&self, out: &mut Vec<u8>) {
        let view = self.view();
        let health = self.health();
        let xids = self.xid_stats();
        let blocked = !self.blocked_reasons().is_empty();
        let gpus: &[GpuInfo] = view.inventory.as_ref().map_or(&[], |i| &i.gpus);
        let mut o = Out {
            s: String::with_capacity(64 * 1024),
        };

        o.header("ccnode_gpu_backend_info");
        o.line(
            "ccnode_gpu_backend_info",
            &format!("backend=\"{}\"", self.kind().as_str()),
            1.0,
        );
        o.header("ccnode_gpu_simulated");
        o.line(
            "ccnode_gpu_simulated",
            "",
            f64::from(u8::from(self.is_simulated())),
        );
        o.header("ccnode_gpu_devices");
        o.line("ccnode_gpu_devices", "", gpus.len() as f64);

        let labels: Vec<String> = gpus.iter().map(base_labels).collect();
        let telemetry: Vec<Option<&Telemetry>> = gpus
            .iter()
            .map(|g| {
                view.samples
                    .iter()
                    .find(|s| s.index == g.index)
                    .and_then(|s| match &s.status {
                        SampleStatus::Ok(t) => Some(&**t),
                        _ => None,
                    })
            })
            .collect();

        if let Some(inv) = &view.inventory {
            o.header("ccnode_gpu_info");
            for (g, l) in gpus.iter().zip(&labels) {
                let info = format!(
                    "{l},minor_number=\"{}\",driver_version=\"{}\",cuda_driver_version=\"{}\",vbios_version=\"{}\",inforom_version=\"{}\",gsp_firmware_version=\"{}\",cc_mode=\"{}\",mig_mode=\"{}\"",
                    g.minor_number.map(|m| m.to_string()).unwrap_or_default(),
                    esc(&inv.driver_version),
                    esc(&inv.cuda_driver_version),
                    esc(&g.vbios_version),
                    esc(g.inforom_version.as_deref().unwrap_or("")),
                    esc(g.gsp_firmware_version.as_deref().unwrap_or("")),
                    g.cc_mode.as_str(),
                    g.mig_mode.as_str(),
                );
                o.line("ccnode_gpu_info", &info, 1.0);
            }
            o.header("ccnode_gpu_memory_total_bytes");
            for (g, l) in gpus.iter().zip(&labels) {
                o.line(
                    "ccnode_gpu_memory_total_bytes",
                    l,
                    g.memory_total_bytes as f64,
                );
            }
        }

        for (name, get) in SIMPLE {
            let values: Vec<_> = telemetry
                .iter()
                .zip(&labels)
                .filter_map(|(t, l)| t.and_then(get).map(|v| (l, v)))
                .collect();
            if values.is_empty() {
                continue;
            }
            o.header(name);
            for (l, v) in values {
                o.line(name, l, v);
            }
        }
        for (name, extra, get) in MULTI {
            let mut header = false;
            for (t, l) in telemetry.iter().zip(&labels) {
                let Some(t) = t else { continue };
                for (value_label, v) in get(t) {
                    let Some(v) = v else { continue };
                    if !header {
                        o.header(name);
                        header = true;
                    }
                    o.line(name, &format!("{l},{extra}=\"{value_label}\""), v);
                }
            }
        }

        // MIG devices.
        let mig_labels = |l: &str, m: &ccnode_gpu::MigDevice| {
            format!(
                "{l},gpu_instance=\"{}\",compute_instance=\"{}\",profile=\"{}\"",
                m.gpu_instance_id,
                m.compute_instance_id,
                esc(&m.profile)
            )
        };
        if gpus.iter().any(|g| !g.mig_devices.is_empty()) {
            o.header("ccnode_gpu_mig_info");
            for (g, l) in gpus.iter().zip(&labels) {
                for m in &g.mig_devices {
                    let ml = mig_labels(l, m);
                    o.line(
                        "ccnode_gpu_mig_info",
                        &format!("{ml},mig_uuid=\"{}\"", esc(&m.uuid)),
                        1.0,
                    );
                }
            }
            o.header("ccnode_gpu_mig_framebuffer_bytes");
            for ((g, l), t) in gpus.iter().zip(&labels).zip(&telemetry) {
                for m in &g.mig_devices {
                    let ml = mig_labels(l, m);
                    o.line(
                        "ccnode_gpu_mig_framebuffer_bytes",
                        &format!("{ml},state=\"total\""),
                        m.memory_total_bytes as f64,
                    );
                    let used = t.and_then(|t| {
                        t.mig.iter().find(|x| {
                            x.gpu_instance_id == m.gpu_instance_id
                                && x.compute_instance_id == m.compute_instance_id
                        })
                    });
                    if let Some(u) = used.and_then(|u| u.fb_used_bytes) {
                        o.line(
                            "ccnode_gpu_mig_framebuffer_bytes",
                            &format!("{ml},state=\"used\""),
                            u as f64,
                        );
                    }
                }
            }
        }

        // XIDs, health.
        o.header("ccnode_gpu_xid_errors_total");
        for ((gpu, xid), n) in &xids.counts {
            if let Some(l) = gpus
                .iter()
                .position(|g| g.index == *gpu)
                .map(|i| &labels[i])
            {
                o.line(
                    "ccnode_gpu_xid_errors_total",
                    &format!("{l},xid=\"{xid}\""),
                    *n as f64,
                );
            }
        }
        o.header("ccnode_gpu_last_xid");
        for (gpu, (xid, _)) in &xids.last {
            if let Some(l) = gpus
                .iter()
                .position(|g| g.index == *gpu)
                .map(|i| &labels[i])
            {
                o.line("ccnode_gpu_last_xid", l, *xid as f64);
            }
        }
        o.header("ccnode_gpu_last_xid_timestamp_seconds");
        for (gpu, (_, at)) in &xids.last {
            if let Some(l) = gpus
                .iter()
                .position(|g| g.index == *gpu)
                .map(|i| &labels[i])
            {
                o.line(
                    "ccnode_gpu_last_xid_timestamp_seconds",
                    l,
                    unix(*at).floor(),
                );
            }
        }
        o.header("ccnode_gpu_lost");
        for (g, l) in gpus.iter().zip(&labels) {
            let lost = health
                .get(&g.index)
                .is_some_and(|h| h.problems.iter().any(|p| p == "fallen off the bus"));
            o.line("ccnode_gpu_lost", l, f64::from(u8::from(lost)));
        }
        o.header("ccnode_gpu_health");
        for (g, l) in gpus.iter().zip(&labels) {
            let ok = health.get(&g.index).is_none_or(|h| h.healthy);
            o.line("ccnode_gpu_health", l, f64::from(u8::from(ok)));
        }

        // Drift and admission.
        o.header("ccnode_gpu_drift");
        for d in &view.drift {
            let l = format!(
                "field=\"{}\",gpu=\"{}\",uuid=\"{}\",expected=\"{}\",found=\"{}\",action=\"{}\"",
                d.drift.field,
                d.drift.gpu.map(|g| g.to_string()).unwrap_or_default(),
                esc(d.drift.uuid.as_deref().unwrap_or("")),
                esc(&d.drift.expected),
                esc(&d.drift.found),
                d.action.as_str()
            );
            o.line("ccnode_gpu_drift", &l, 1.0);
        }
        o.header("ccnode_gpu_drift_fields");
        o.line("ccnode_gpu_drift_fields", "", view.drift.len() as f64);
        o.header("ccnode_gpu_workers_blocked");
        o.line(
            "ccnode_gpu_workers_blocked",
            "",
            f64::from(u8::from(blocked)),
        );

        // The monitor itself.
        let c = &self.counters;
        let get =
            |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
        o.header("ccnode_gpu_polls_total");
        o.line("ccnode_gpu_polls_total", "result=\"ok\"", get(&c.polls_ok));
        o.line(
            "ccnode_gpu_polls_total",
            "result=\"error\"",
            get(&c.polls_failed),
        );
        o.header("ccnode_gpu_poll_seconds_total");
        o.line(
            "ccnode_gpu_poll_seconds_total",
            "",
            get(&c.poll_micros) / 1e6,
        );
        o.header("ccnode_gpu_last_poll_duration_seconds");
        o.line(
            "ccnode_gpu_last_poll_duration_seconds",
            "",
            view.last_poll_duration.as_secs_f64(),
        );
        if let Some(t) = view.last_poll {
            o.header("ccnode_gpu_last_poll_timestamp_seconds");
            o.line(
                "ccnode_gpu_last_poll_timestamp_seconds",
                "",
                unix(t).floor(),
            );
        }
        o.header("ccnode_gpu_events_total");
        for (ty, a) in [
            ("xid", &c.events_xid),
            ("ecc_corrected", &c.events_ecc_corrected),
            ("ecc_uncorrected", &c.events_ecc_uncorrected),
            ("lost", &c.events_lost),
            ("mig_config_change", &c.events_mig_config_change),
        ] {
            o.line("ccnode_gpu_events_total", &format!("type=\"{ty}\""), get(a));
        }
        o.header("ccnode_gpu_event_errors_total");
        o.line("ccnode_gpu_event_errors_total", "", get(&c.event_errors));

        out.extend_from_slice(o.s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_family_is_documented() {
        let doc = include_str!("../../../docs/metrics.md");
        for (name, _, _, dcgm) in FAMILIES {
            assert!(doc.contains(name), "docs/metrics.md lacks {name}");
            for field in dcgm.split(", ").filter(|f| !f.is_empty()) {
                let field = field.split(' ').next().unwrap();
                assert!(
                    doc.contains(field),
                    "docs/metrics.md lacks {field} for {name}"
                );
            }
        }
    }
}
