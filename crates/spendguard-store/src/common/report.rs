//! How a report is read (its plan over the rollup tables) and summed into groups.

use super::*;

/// Orders a user's day: by cost descending, then by model.
pub(crate) fn sort_models(models: &mut [crate::ModelUsage]) {
    models.sort_by(|a, b| {
        b.totals
            .cost
            .cmp(&a.totals.cost)
            .then_with(|| a.model.cmp(&b.model))
    });
}

/// Reads the sums of a `usage_rollups` row (or of a group of them).
pub(crate) fn usage_totals(
    requests: i64,
    input: i64,
    cached: i64,
    output: i64,
    cost: i64,
) -> Result<UsageTotals, StoreError> {
    Ok(UsageTotals {
        requests: to_u64("requests", requests)?,
        input_tokens: to_u64("input_tokens", input)?,
        cached_input_tokens: to_u64("cached_input_tokens", cached)?,
        output_tokens: to_u64("output_tokens", output)?,
        cost: Money::from_micros(cost),
    })
}

/// A range of `rollups` rows a report reads: the window, and the first and the last window
/// start (inclusive).
pub(crate) type RollupRange = (Window, Micros, Micros);

/// What a report reads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReportPlan {
    /// The `usage_rollups` rows of a dimension with `day_start` in the query's days.
    Usage(Dim),
    /// The `rollups` rows of each of `kinds` (of the query's tenant, if any) in `ranges`.
    Rollups {
        kinds: Vec<ScopeKind>,
        ranges: Vec<RollupRange>,
    },
}

impl ReportPlan {
    /// The plan of `query`. `Day` reads the day rows of the global scope (or of the tenant);
    /// `Tenant`, `Company` (with the tenants', see [`Groups::add_scope`]) and `User` read
    /// each whole month of [`ReportQuery::whole_months`] from its month row and the other
    /// days from day rows; `Model` and `Endpoint` read `usage_rollups`.
    pub fn new(query: &ReportQuery) -> Result<ReportPlan, StoreError> {
        let kinds = match query.group_by {
            GroupBy::Model => return Ok(ReportPlan::Usage(Dim::Model)),
            GroupBy::Endpoint => return Ok(ReportPlan::Usage(Dim::Endpoint)),
            GroupBy::Day if query.tenant.is_some() => vec![ScopeKind::Tenant],
            GroupBy::Day => vec![ScopeKind::Global],
            GroupBy::Tenant => vec![ScopeKind::Tenant],
            GroupBy::Company => vec![ScopeKind::Company, ScopeKind::Tenant],
            GroupBy::User => vec![ScopeKind::User],
        };
        let months: &[(Micros, Micros)] = if query.group_by == GroupBy::Day {
            &[]
        } else {
            &query.whole_months
        };
        // Only users have week rows (see `Deltas::add_parts`).
        let weeks = kinds == [ScopeKind::User];
        let mut ranges = Vec::with_capacity(2 * months.len() + 3);
        // The first day start not read yet.
        let mut next = query.from_day;
        for &(start, end) in months {
            if start < next || end <= start || start > query.to_day {
                return Err(StoreError::Invalid(format!(
                    "the whole months of a report must ascend without overlapping and lie \
                     within its days; [{start}, {end}) does not"
                )));
            }
            if start > next {
                push_days(&mut ranges, next, start - 1, weeks);
            }
            ranges.push((Window::Month, start, start));
            next = end;
        }
        if next <= query.to_day {
            push_days(&mut ranges, next, query.to_day, weeks);
        }
        Ok(ReportPlan::Rollups { kinds, ranges })
    }
}

/// Adds the ranges that read the days starting in `[first, last]`: with `weeks`, each week
/// bucket whose every instant lies in `[first, last]` (so every day starting in it is one of
/// these days) from its week row, and the days before and after the buckets from day rows.
fn push_days(ranges: &mut Vec<RollupRange>, first: Micros, last: Micros, weeks: bool) {
    if weeks {
        // The first bucket starting at or after `first`, and the bucket after the last one
        // that ends by `last`.
        let from = week_bucket(first.saturating_add(WEEK_MICROS - 1));
        let to = week_bucket(last.saturating_add(1));
        if from < to {
            if first < from {
                ranges.push((Window::Day, first, from - 1));
            }
            ranges.push((Window::Week, from, to - WEEK_MICROS));
            if to <= last {
                ranges.push((Window::Day, to, last));
            }
            return;
        }
    }
    ranges.push((Window::Day, first, last));
}

/// `a - b` for each sum (saturating): what `a` holds beyond `b`.
fn minus(a: &UsageTotals, b: &UsageTotals) -> UsageTotals {
    UsageTotals {
        requests: a.requests.saturating_sub(b.requests),
        input_tokens: a.input_tokens.saturating_sub(b.input_tokens),
        cached_input_tokens: a.cached_input_tokens.saturating_sub(b.cached_input_tokens),
        output_tokens: a.output_tokens.saturating_sub(b.output_tokens),
        cost: a.cost.saturating_sub(b.cost),
    }
}

/// The groups of a report, summed from the rows of a [`ReportPlan`] (or from groups already
/// summed by the database).
#[derive(Debug)]
pub(crate) struct Groups {
    group_by: GroupBy,
    days: HashMap<Micros, UsageTotals>,
    /// By `tenant \n key` (ids never hold a line feed), or by key alone.
    named: HashMap<String, ReportRow>,
    /// `Company`: the totals of each tenant.
    tenants: HashMap<String, UsageTotals>,
    buf: String,
}

impl Groups {
    pub fn new(group_by: GroupBy) -> Groups {
        Groups {
            group_by,
            days: HashMap::new(),
            named: HashMap::new(),
            tenants: HashMap::new(),
            buf: String::new(),
        }
    }

    /// Adds a row of `day`, `tenant` and `key` (the columns the grouping does not use are
    /// ignored).
    pub fn add(&mut self, day: Micros, tenant: &str, key: &str, totals: &UsageTotals) {
        let (tenant, key) = match self.group_by {
            GroupBy::Day => {
                self.days.entry(day).or_default().add(totals);
                return;
            }
            GroupBy::Tenant => (Some(tenant), None),
            GroupBy::Company | GroupBy::User => (Some(tenant), Some(key)),
            GroupBy::Model | GroupBy::Endpoint => (None, Some(key)),
        };
        self.buf.clear();
        if let Some(t) = tenant {
            self.buf.push_str(t);
        }
        self.buf.push('\n');
        if let Some(k) = key {
            self.buf.push_str(k);
        }
        if let Some(row) = self.named.get_mut(self.buf.as_str()) {
            row.totals.add(totals);
            return;
        }
        self.named.insert(
            self.buf.clone(),
            ReportRow {
                day: None,
                tenant: tenant.map(str::to_owned),
                key: key.filter(|k| !k.is_empty()).map(str::to_owned),
                totals: *totals,
            },
        );
    }

    /// Adds a `rollups` row (or a group of them) of a scope of `kind`: `start` is its window
    /// start, `tenant` and `id` its `tenant_id` and `scope_id`. For `Company`, the tenants'
    /// rows are their totals: the part of a tenant's totals not in its companies' rows is the
    /// usage without a company, reported as the tenant's group without a key.
    pub fn add_scope(
        &mut self,
        kind: ScopeKind,
        start: Micros,
        tenant: &str,
        id: &str,
        totals: &UsageTotals,
    ) {
        if self.group_by == GroupBy::Company && kind == ScopeKind::Tenant {
            match self.tenants.get_mut(tenant) {
                Some(sum) => sum.add(totals),
                None => {
                    self.tenants.insert(tenant.to_owned(), *totals);
                }
            }
        } else {
            self.add(start, tenant, id, totals);
        }
    }

    /// `Company`: each tenant's group without a company (its totals minus its companies'),
    /// unless every sum of it is zero.
    fn without_company(&self) -> Vec<ReportRow> {
        let mut companies: HashMap<&str, UsageTotals> = HashMap::new();
        for row in self.named.values() {
            if let Some(tenant) = &row.tenant {
                companies
                    .entry(tenant.as_str())
                    .or_default()
                    .add(&row.totals);
            }
        }
        let mut out = Vec::new();
        for (tenant, totals) in &self.tenants {
            let rest = match companies.get(tenant.as_str()) {
                Some(in_companies) => minus(totals, in_companies),
                None => *totals,
            };
            if rest != UsageTotals::default() {
                out.push(ReportRow {
                    day: None,
                    tenant: Some(tenant.clone()),
                    key: None,
                    totals: rest,
                });
            }
        }
        out
    }

    /// The report: totals over every group, then the rows in order, cut to `limit`.
    pub fn finish(self, limit: Option<usize>) -> Report {
        let mut rows: Vec<ReportRow> = if self.group_by == GroupBy::Day {
            self.days
                .into_iter()
                .map(|(day, totals)| ReportRow {
                    day: Some(day),
                    tenant: None,
                    key: None,
                    totals,
                })
                .collect()
        } else {
            let mut rows = self.without_company();
            rows.extend(self.named.into_values());
            rows
        };
        let mut totals = UsageTotals::default();
        for row in &rows {
            totals.add(&row.totals);
        }
        if self.group_by == GroupBy::Day {
            rows.sort_unstable_by_key(|r| r.day);
        } else {
            rows.sort_unstable_by(|a, b| {
                b.totals
                    .cost
                    .cmp(&a.totals.cost)
                    .then_with(|| a.tenant.cmp(&b.tenant))
                    .then_with(|| a.key.cmp(&b.key))
            });
        }
        let groups = rows.len();
        if let Some(limit) = limit {
            rows.truncate(limit);
        }
        Report {
            rows,
            totals,
            groups,
        }
    }
}

/// A limit as an SQL `LIMIT` value (`None`: no limit).
pub(crate) fn sql_limit(limit: Option<usize>) -> i64 {
    limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_months_replace_their_days() {
        let query = ReportQuery {
            from_day: 10,
            to_day: 100,
            group_by: GroupBy::User,
            whole_months: vec![(20, 40), (40, 60), (70, 95)],
            ..ReportQuery::default()
        };
        let plan = |q: &ReportQuery| ReportPlan::new(q).unwrap();
        assert_eq!(
            plan(&query),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::User],
                ranges: vec![
                    (Window::Day, 10, 19),
                    (Window::Month, 20, 20),
                    (Window::Month, 40, 40),
                    (Window::Day, 60, 69),
                    (Window::Month, 70, 70),
                    (Window::Day, 95, 100),
                ],
            }
        );
        // A month ending the range leaves no days after it; one starting it none before.
        let edges = ReportQuery {
            whole_months: vec![(10, 50), (50, 101)],
            group_by: GroupBy::Company,
            ..query.clone()
        };
        assert_eq!(
            plan(&edges),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::Company, ScopeKind::Tenant],
                ranges: vec![(Window::Month, 10, 10), (Window::Month, 50, 50)],
            }
        );
        // `Day` reads days only, of the global scope or of the tenant.
        let days = ReportQuery {
            group_by: GroupBy::Day,
            ..query.clone()
        };
        assert_eq!(
            plan(&days),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::Global],
                ranges: vec![(Window::Day, 10, 100)],
            }
        );
        let tenant_days = ReportQuery {
            tenant: Some(TenantId::parse("t").unwrap()),
            ..days
        };
        assert_eq!(
            plan(&tenant_days),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::Tenant],
                ranges: vec![(Window::Day, 10, 100)],
            }
        );
        let models = ReportQuery {
            group_by: GroupBy::Model,
            ..query.clone()
        };
        assert_eq!(plan(&models), ReportPlan::Usage(Dim::Model));
        // No days at all: nothing to read.
        let empty = ReportQuery {
            from_day: 5,
            to_day: 4,
            whole_months: Vec::new(),
            ..query.clone()
        };
        assert!(matches!(
            plan(&empty),
            ReportPlan::Rollups { ranges, .. } if ranges.is_empty()
        ));
        for months in [
            vec![(5, 20)],
            vec![(101, 120)],
            vec![(20, 40), (30, 50)],
            vec![(40, 60), (20, 40)],
            vec![(20, 20)],
        ] {
            let bad = ReportQuery {
                whole_months: months,
                ..query.clone()
            };
            assert!(matches!(ReportPlan::new(&bad), Err(StoreError::Invalid(_))));
        }
    }

    #[test]
    fn users_read_whole_week_buckets_instead_of_their_days() {
        const DAY: Micros = 86_400_000_000;
        const W: Micros = WEEK_MICROS;
        // Day starts one hour before midnight UTC (a time zone an hour east of UTC): the
        // bucket of a day is the one its start falls in.
        let day = |n: i64| n * DAY - 3_600_000_000;
        let plan = |from, to, group_by, months: Vec<(Micros, Micros)>| match ReportPlan::new(
            &ReportQuery {
                from_day: from,
                to_day: to,
                group_by,
                whole_months: months,
                ..ReportQuery::default()
            },
        )
        .unwrap()
        {
            ReportPlan::Rollups { ranges, .. } => ranges,
            other => panic!("{other:?}"),
        };
        // Days 3 to 32 (30 days; buckets start at days 0, 7, 14, ...): the days starting
        // before the first bucket boundary come from day rows, then the buckets of days 7, 14
        // and 21 whole, then the days from 28 (day 28 starts an hour before its bucket, so it
        // is in the bucket of day 21).
        assert_eq!(
            plan(day(3), day(32), GroupBy::User, Vec::new()),
            vec![
                (Window::Day, day(3), W - 1),
                (Window::Week, W, 3 * W),
                (Window::Day, 4 * W, day(32)),
            ]
        );
        // The last day's start is all the plan knows of its end: a bucket that ends with the
        // range's last day is read as days.
        assert_eq!(
            plan(W, 3 * W - DAY, GroupBy::User, Vec::new()),
            vec![(Window::Week, W, W), (Window::Day, 2 * W, 3 * W - DAY)]
        );
        assert_eq!(
            plan(W, 3 * W - DAY, GroupBy::User, vec![(3 * W - DAY, 3 * W)]),
            vec![(Window::Week, W, W), (Window::Day, 2 * W, 3 * W - DAY - 1)]
                .into_iter()
                .chain([(Window::Month, 3 * W - DAY, 3 * W - DAY)])
                .collect::<Vec<_>>(),
        );
        // A gap before a month that ends exactly at a bucket boundary reads that bucket.
        assert_eq!(
            plan(W, 2 * W, GroupBy::User, vec![(2 * W, 2 * W + DAY)]),
            vec![(Window::Week, W, W), (Window::Month, 2 * W, 2 * W)]
        );
        // Fewer than seven days: day rows only; and other groupings never read weeks.
        assert_eq!(
            plan(day(8), day(12), GroupBy::User, Vec::new()),
            vec![(Window::Day, day(8), day(12))]
        );
        assert_eq!(
            plan(day(3), day(32), GroupBy::Company, Vec::new()),
            vec![(Window::Day, day(3), day(32))]
        );
        // Whatever the range, the ranges read cover each of its day starts exactly once, by
        // a day row or by the week bucket it falls in.
        for from in 0..20 {
            for len in 0..40 {
                let (first, last) = (day(from), day(from + len));
                let ranges = plan(first, last, GroupBy::User, Vec::new());
                for n in from - 2..=from + len + 2 {
                    let d = day(n);
                    let hits = ranges
                        .iter()
                        .filter(|&&(w, lo, hi)| match w {
                            Window::Day => lo <= d && d <= hi,
                            Window::Week => lo <= week_bucket(d) && week_bucket(d) <= hi,
                            _ => false,
                        })
                        .count();
                    let inside = first <= d && d <= last;
                    assert_eq!(hits, usize::from(inside), "day {n} of {from}+{len}");
                }
            }
        }
    }
}
