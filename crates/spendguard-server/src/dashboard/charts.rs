//! The charts, as inline SVG drawn on the server: daily spend (bars), daily spend stacked by
//! model, and the month's cumulative spend against its budget with the projection. Each
//! carries its figures in `data-*` attributes (exact, 6 decimals), so tests and tools can
//! read what is drawn.

use std::collections::BTreeMap;

use jiff::civil::Date;
use maud::{Markup, html};
use spendguard_core::Money;

use super::usd_cents;

/// The shortest bar of a day with spend, so that small days stay visible.
pub const MIN_BAR: f64 = 2.0;
/// The most models the stacked chart tells apart; the rest are "other".
pub const STACKED_MODELS: usize = 6;
/// The colours of the stacked chart's models, then of "other".
pub const PALETTE: [&str; 7] = [
    "#3b6fd8", "#e07b39", "#2e9e6b", "#a04fc4", "#d4a72c", "#d6457a", "#8a94a6",
];

const W: f64 = 1100.0;
const H: f64 = 220.0;
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 16.0;

/// A round axis maximum at or above `top`: 1, 2 or 5 × 10^k micro-dollars.
pub fn axis_max(top: i64) -> i64 {
    let top = top.max(1);
    let mut step = 1i64;
    while step.saturating_mul(10) < top {
        step = step.saturating_mul(10);
    }
    [1i64, 2, 5, 10]
        .into_iter()
        .map(|m| m.saturating_mul(step))
        .find(|v| *v >= top)
        .unwrap_or(top)
}

fn plot_h() -> f64 {
    H - BOTTOM - TOP
}

fn y_of(v: i64, axis: i64) -> f64 {
    TOP + plot_h() - plot_h() * (v as f64 / axis as f64)
}

fn grid(axis: i64) -> Markup {
    html! {
        @for i in 0..=4i64 {
            @let v = axis / 4 * i;
            @let y = y_of(v, axis);
            line.grid x1=(LEFT) x2=(W - 8.0) y1=(format!("{y:.1}")) y2=(format!("{y:.1}")) {}
            text x=(LEFT - 6.0) y=(format!("{:.1}", y + 4.0)) text-anchor="end" { (usd_cents(Money::from_micros(v))) }
        }
    }
}

/// Which days get a label: about 7 of them, and the last.
fn labelled(i: usize, n: usize) -> bool {
    let every = n.div_ceil(7).max(1);
    i % every == 0 || i + 1 == n
}

fn bar_height(cost: Money, axis: i64) -> f64 {
    let h = plot_h() * (cost.micros() as f64 / axis as f64);
    if cost > Money::ZERO {
        h.max(MIN_BAR)
    } else {
        h
    }
}

/// Daily spend as bars, with the daily cap as a dashed line when it is within twice the
/// highest day (else the axis would flatten every bar).
pub fn daily(id: &str, days: &[(Date, Money)], cap: Option<Money>) -> Markup {
    let max = days
        .iter()
        .map(|(_, c)| c.micros())
        .max()
        .unwrap_or(0)
        .max(1);
    let cap = cap
        .map(|c| c.micros())
        .filter(|c| *c > 0 && *c <= max.saturating_mul(2));
    let axis = axis_max(max.max(cap.unwrap_or(0)));
    let n = days.len().max(1);
    let slot = (W - LEFT - 8.0) / n as f64;
    let peak = days
        .iter()
        .enumerate()
        .max_by_key(|(_, (_, c))| *c)
        .map(|(i, _)| i);
    html! {
        svg id=(id) viewBox=(format!("0 0 {W} {H}")) width="100%" role="img" aria-label="Daily spend" {
            (grid(axis))
            @for (i, (date, cost)) in days.iter().enumerate() {
                @let bh = bar_height(*cost, axis);
                @let x = LEFT + slot * i as f64 + slot * 0.15;
                @let y = TOP + plot_h() - bh;
                rect.bar x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{:.1}", slot * 0.7)) height=(format!("{bh:.1}")) data-day=(date.to_string()) data-cost=(cost.to_string()) {
                    title { (date.to_string()) ": " (usd_cents(*cost)) }
                }
                @if peak == Some(i) && *cost > Money::ZERO {
                    text.peak x=(format!("{:.1}", x + slot * 0.35)) y=(format!("{:.1}", (y - 4.0).max(10.0))) text-anchor="middle" { (usd_cents(*cost)) }
                }
                @if labelled(i, days.len()) {
                    @let d = date.to_string();
                    text x=(format!("{:.1}", x + slot * 0.35)) y=(H - 6.0) text-anchor="middle" { (d.get(5..).unwrap_or(&d)) }
                }
            }
            @if let Some(c) = cap {
                @let y = y_of(c, axis);
                line.cap x1=(LEFT) x2=(W - 8.0) y1=(format!("{y:.1}")) y2=(format!("{y:.1}")) {}
                text.cap x=(LEFT + 4.0) y=(format!("{:.1}", y - 4.0)) { "daily cap" }
            }
        }
    }
}

/// The models the stacked chart names, by total spend descending (at most
/// [`STACKED_MODELS`]; the rest are summed as "other").
pub fn top_models(per_day: &BTreeMap<Date, BTreeMap<String, Money>>) -> Vec<String> {
    let mut totals: BTreeMap<&str, Money> = BTreeMap::new();
    for models in per_day.values() {
        for (m, c) in models {
            let e = totals.entry(m).or_insert(Money::ZERO);
            *e = e.saturating_add(*c);
        }
    }
    let mut v: Vec<(&str, Money)> = totals.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.into_iter()
        .take(STACKED_MODELS)
        .map(|(m, _)| m.to_owned())
        .collect()
}

/// Each segment with the sum of those below it.
fn stacked_at(segs: Vec<(usize, String, Money)>) -> Vec<(usize, String, Money, i64)> {
    let mut below = 0i64;
    segs.into_iter()
        .map(|(i, m, c)| {
            let at = below;
            below = below.saturating_add(c.micros());
            (i, m, c, at)
        })
        .collect()
}

/// Daily spend stacked by model: one segment per model and day, the biggest model at the
/// bottom, with a legend.
pub fn stacked(days: &[Date], per_day: &BTreeMap<Date, BTreeMap<String, Money>>) -> Markup {
    let names = top_models(per_day);
    let stack = |d: &Date| -> Vec<(usize, String, Money)> {
        let mut segs: Vec<(usize, String, Money)> = Vec::new();
        let mut other = Money::ZERO;
        if let Some(models) = per_day.get(d) {
            for (m, c) in models {
                match names.iter().position(|n| n == m) {
                    Some(i) => segs.push((i, m.clone(), *c)),
                    None => other = other.saturating_add(*c),
                }
            }
        }
        segs.sort_by_key(|s| s.0);
        if other > Money::ZERO {
            segs.push((STACKED_MODELS, "other".to_owned(), other));
        }
        segs
    };
    let max = days
        .iter()
        .map(|d| {
            stack(d)
                .iter()
                .fold(Money::ZERO, |a, s| a.saturating_add(s.2))
                .micros()
        })
        .max()
        .unwrap_or(0);
    let axis = axis_max(max);
    let n = days.len().max(1);
    let slot = (W - LEFT - 8.0) / n as f64;
    let any_other = days
        .iter()
        .any(|d| stack(d).iter().any(|s| s.0 == STACKED_MODELS));
    html! {
        svg #model-chart viewBox=(format!("0 0 {W} {H}")) width="100%" role="img" aria-label="Daily spend by model" {
            (grid(axis))
            @for (i, d) in days.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + slot * 0.15;
                @for (ci, model, cost, below) in stacked_at(stack(d)) {
                    @let y_top = y_of(below.saturating_add(cost.micros()), axis);
                    @let y_bottom = y_of(below, axis);
                    rect.seg x=(format!("{x:.1}")) y=(format!("{y_top:.1}")) width=(format!("{:.1}", slot * 0.7)) height=(format!("{:.1}", (y_bottom - y_top).max(0.0))) fill=(PALETTE[ci.min(PALETTE.len() - 1)]) data-day=(d.to_string()) data-model=(model) data-cost=(cost.to_string()) {
                        title { (d.to_string()) " · " (model) ": " (usd_cents(cost)) }
                    }
                }
                @if labelled(i, days.len()) {
                    @let s = d.to_string();
                    text x=(format!("{:.1}", x + slot * 0.35)) y=(H - 6.0) text-anchor="middle" { (s.get(5..).unwrap_or(&s)) }
                }
            }
        }
        div.legend {
            @for (i, m) in names.iter().enumerate() {
                span { i style=(format!("background:{}", PALETTE[i])) {} (m) }
            }
            @if any_other { span { i style=(format!("background:{}", PALETTE[STACKED_MODELS])) {} "other" } }
        }
    }
}

/// The month so far, cumulative, against the monthly budget (a dashed line) and the
/// projection to the month's end (dashed, from today's point). `days`: the month's days
/// up to today, oldest first; `length`: how many days the month has.
pub fn cumulative(
    days: &[(Date, Money)],
    length: usize,
    budget: Option<Money>,
    projected: Option<Money>,
) -> Markup {
    let mut running = Vec::with_capacity(days.len());
    let mut sum = Money::ZERO;
    for (d, c) in days {
        sum = sum.saturating_add(*c);
        running.push((*d, sum));
    }
    let top = sum
        .micros()
        .max(budget.map_or(0, |b| b.micros()))
        .max(projected.map_or(0, |p| p.micros()));
    let axis = axis_max(top);
    let length = length.max(days.len()).max(1);
    let step = (W - LEFT - 8.0) / length as f64;
    let x_of = |i: usize| LEFT + step * (i as f64 + 1.0);
    let mut path = format!("M{LEFT:.1},{:.1}", y_of(0, axis));
    for (i, (_, v)) in running.iter().enumerate() {
        path.push_str(&format!(" L{:.1},{:.1}", x_of(i), y_of(v.micros(), axis)));
    }
    let last_x = if running.is_empty() {
        LEFT
    } else {
        x_of(running.len() - 1)
    };
    html! {
        svg #month-chart viewBox=(format!("0 0 {W} {H}")) width="100%" role="img" aria-label="This month's cumulative spend"
            data-spent=(sum.to_string())
            data-budget=[budget.map(|b| b.to_string())]
            data-projected=[projected.map(|p| p.to_string())] {
            (grid(axis))
            path.spend d=(path) {}
            @if let Some(p) = projected {
                path.projection d=(format!("M{last_x:.1},{:.1} L{:.1},{:.1}", y_of(sum.micros(), axis), x_of(length - 1), y_of(p.micros(), axis))) {}
                text x=(format!("{:.1}", x_of(length - 1) - 4.0)) y=(format!("{:.1}", (y_of(p.micros(), axis) - 6.0).max(10.0))) text-anchor="end" { "projected " (usd_cents(p)) }
            }
            @if let Some(b) = budget {
                @let y = y_of(b.micros(), axis);
                line.cap x1=(LEFT) x2=(W - 8.0) y1=(format!("{y:.1}")) y2=(format!("{y:.1}")) {}
                text.cap x=(LEFT + 4.0) y=(format!("{:.1}", y - 4.0)) { "monthly budget " (usd_cents(b)) }
            }
            @for (i, (d, _)) in running.iter().enumerate() {
                @if labelled(i, length) {
                    @let s = d.to_string();
                    text x=(format!("{:.1}", x_of(i))) y=(H - 6.0) text-anchor="middle" { (s.get(5..).unwrap_or(&s)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> Date {
        s.parse().unwrap()
    }

    #[test]
    fn the_daily_chart_has_a_bar_per_day_scaled_to_a_round_maximum() {
        let days: Vec<(Date, Money)> = (1..=30)
            .map(|i| {
                (
                    date(&format!("2026-03-{i:02}")),
                    Money::from_micros(i * 100_000),
                )
            })
            .collect();
        let svg = daily("daily-chart", &days, None).into_string();
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 30);
        assert!(
            svg.contains(r#"data-day="2026-03-30" data-cost="3.000000""#),
            "{svg}"
        );
        // $3.00 max → a $5.00 axis; a cap far above is not drawn.
        assert!(svg.contains(">$5.00</text>"));
        assert!(
            !daily("d", &days, Some(Money::from_micros(100_000_000)))
                .into_string()
                .contains("class=\"cap\"")
        );
        let with_cap = daily("d", &days, Some(Money::from_micros(4_000_000))).into_string();
        assert!(with_cap.contains("class=\"cap\""));
        assert!(with_cap.contains(">$5.00</text>"));
    }

    #[test]
    fn the_stacked_chart_names_the_biggest_models_and_sums_the_rest() {
        let days: Vec<Date> = vec![date("2026-03-01"), date("2026-03-02")];
        let mut per_day: BTreeMap<Date, BTreeMap<String, Money>> = BTreeMap::new();
        for (i, m) in ["a", "b", "c", "d", "e", "f", "g", "h"].iter().enumerate() {
            per_day.entry(days[i % 2]).or_default().insert(
                (*m).to_owned(),
                Money::from_micros(1_000_000 * (i as i64 + 1)),
            );
        }
        let svg = stacked(&days, &per_day).into_string();
        // h, g, f, e, d, c named; a and b (the smallest) are "other", on 2026-03-01 (a)
        // and 2026-03-02 (b).
        assert_eq!(top_models(&per_day), ["h", "g", "f", "e", "d", "c"]);
        assert!(
            svg.contains(r#"data-day="2026-03-01" data-model="other" data-cost="1.000000""#),
            "{svg}"
        );
        assert!(svg.contains(r#"data-day="2026-03-02" data-model="other" data-cost="2.000000""#));
        assert_eq!(svg.matches("<rect class=\"seg\"").count(), 8);
        // A model name is escaped.
        per_day
            .entry(days[0])
            .or_default()
            .insert("<b>".into(), Money::from_micros(99_000_000));
        let svg = stacked(&days, &per_day).into_string();
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"));
    }

    #[test]
    fn the_month_chart_carries_spend_budget_and_projection() {
        let days: Vec<(Date, Money)> = (1..=10)
            .map(|i| {
                (
                    date(&format!("2026-03-{i:02}")),
                    Money::from_micros(1_000_000),
                )
            })
            .collect();
        let svg = cumulative(
            &days,
            31,
            Some(Money::from_micros(25_000_000)),
            Some(Money::from_micros(31_000_000)),
        )
        .into_string();
        assert!(svg.contains(r#"data-spent="10.000000""#), "{svg}");
        assert!(svg.contains(r#"data-budget="25.000000""#));
        assert!(svg.contains(r#"data-projected="31.000000""#));
        assert!(svg.contains("class=\"projection\""));
        assert!(svg.contains("monthly budget $25.00"));
    }
}
