//! Boots real microVMs with mm-vmm on our kernel and initramfs.
//!
//! Cold boots are slow on PVM hosts (~75 s), so each test boots once and
//! checks as much as that one guest can show.

use mm_integration::guest::Boot;
use mm_integration::kvm_available;

/// 500 short processes: 25 rounds of a 4-stage pipeline whose output is
/// checked, and 8 background jobs (a subshell and the command it runs), each
/// reporting its command's exit status in a file (a SIGSEGV is status 139; a
/// job that dies itself never reports). The count of processes is the
/// kernel's (`processes` in /proc/stat, forks since boot) before and after,
/// read and waited for with shell builtins only, so nothing but the workload
/// adds to it. The shell never `wait`s on a running job: on PVM hosts that
/// blocks forever (README, Known problems).
const STRESS: &str = r#"forks() { while read k v rest; do [ "$k" = processes ] && echo $v; done < /proc/stat; }
mkdir -p /tmp/st; mkfifo /tmp/st-tick; exec 3<>/tmp/st-tick
p0=$(forks); bad=0; i=0
while [ $i -lt 25 ]; do
  r=$(echo hello world | tr a-z A-Z | cut -c1-5 | wc -c)
  [ "$r" = 6 ] || { bad=$((bad+1)); echo "BAD pipeline $i: [$r]"; }
  for j in 1 2 3 4 5 6 7 8; do (/bin/true; echo $? > /tmp/st/$i.$j) & done
  i=$((i+1))
done
t=0; while set -- /tmp/st/*; [ $# -lt 200 ] && [ $t -lt 900 ]; do t=$((t+1)); read -t 1 x <&3; done
p1=$(forks)
for f in /tmp/st/*; do [ "$(cat $f)" = 0 ] || { bad=$((bad+1)); echo "BAD job $f"; }; done
m=$((200 - $#)); [ $m = 0 ] || { bad=$((bad+m)); echo "BAD $m jobs never reported"; }
echo "STRESS processes=$((p1 - p0)) waited=${t}s failures=$bad"
[ $bad = 0 ]"#;

#[test]
fn echo_reaches_the_console_and_the_exit_status_comes_back() {
    if !kvm_available("echo_reaches_the_console_and_the_exit_status_comes_back") {
        return;
    }
    let run = Boot::new(&["sh", "-c", "echo hello from the guest; exit 7"]).run().unwrap();
    assert!(
        run.stdout.lines().any(|l| l.trim() == "hello from the guest"),
        "console:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("mm-init: user space started"));
    assert_eq!(run.status, Some(7), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("first KVM_RUN"), "stderr:\n{}", run.stderr);
}

#[test]
fn two_vcpus_come_online() {
    if !kvm_available("two_vcpus_come_online") {
        return;
    }
    let run = Boot::new(&["cat", "/sys/devices/system/cpu/online"]).cpus(2).run().unwrap();
    let context = format!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.lines().any(|l| l.trim() == "0-1"), "{context}");
    assert_eq!(run.status, Some(0), "{context}");
}

#[test]
fn user_space_survives_500_processes() {
    if !kvm_available("user_space_survives_500_processes") {
        return;
    }
    let run = Boot::new(&["sh", "-c", STRESS]).cpus(2).run().unwrap();
    let context = format!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let summary = run.stdout.lines().find(|l| l.starts_with("STRESS ")).unwrap_or_else(|| panic!("{context}"));
    let processes: u32 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("processes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{context}"));
    assert!(processes >= 500, "only {processes} processes ran");
    assert!(summary.ends_with("failures=0"), "{context}");
    assert!(!run.stdout.contains("segfault"), "a guest process crashed:\n{context}");
    assert_eq!(run.status, Some(0), "{context}");
}

#[test]
fn a_bzimage_boots_to_user_space_too() {
    if !kvm_available("a_bzimage_boots_to_user_space_too") {
        return;
    }
    let run = Boot::new(&["sh", "-c", "echo bzimage-ok"]).bzimage().run().unwrap();
    let context = format!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.lines().any(|l| l.trim() == "bzimage-ok"), "{context}");
    assert_eq!(run.status, Some(0), "{context}");
}
