//! A deterministic simulated tenant (`fixture`): the users and groups the tests, the benches
//! and the demo start from.

use super::*;

/// A generated tenant: `tenant.users` holds the `n` members of "All Employees" plus the CEO
/// (so `n + 1` users).
pub struct Fixture {
    pub tenant: Tenant,
    pub all_group_id: String,
    pub nested_group_id: String,
    pub ceo_id: String,
}

pub const FIXTURE_TENANT_ID: &str = "6f1d2c3b-4a5e-4f60-9a7b-8c9d0e1f2a3b";
pub const FIXTURE_CLIENT_ID: &str = "3e5a7c9b-1d2f-4a6b-8c0d-2e4f6a8b0c1d";
pub const FIXTURE_CLIENT_SECRET: &str = "sim-secret-value";
pub const FIXTURE_DOMAIN: &str = "contoso-sim.onmicrosoft.com";

const FIRST_NAMES: &[&str] = &[
    "Olivia",
    "Liam",
    "Emma",
    "Noah",
    "Amelia",
    "Oliver",
    "Sophia",
    "Elijah",
    "Isabella",
    "Lucas",
    "Mia",
    "Mateo",
    "Charlotte",
    "Ethan",
    "Harper",
    "Aarav",
    "Priya",
    "Wei",
    "Mei",
    "Hiroshi",
    "Yuki",
    "Fatima",
    "Omar",
    "Lars",
    "Ingrid",
    "Pierre",
    "Camille",
    "Giulia",
    "Marco",
    "Sven",
    "Anika",
    "Kwame",
    "Amara",
    "Diego",
    "Lucia",
    "Rafael",
    "Chloe",
    "Daniel",
    "Grace",
    "Samuel",
    "Hannah",
    "Arjun",
    "Nadia",
    "Tomasz",
    "Katarzyna",
    "Jonas",
    "Elena",
    "Ana",
    "Kenji",
    "Leila",
];

const LAST_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Patel",
    "Kumar",
    "Nguyen",
    "Kim",
    "Chen",
    "Wang",
    "Tanaka",
    "Suzuki",
    "Schmidt",
    "Mueller",
    "Rossi",
    "Bianchi",
    "Dubois",
    "Moreau",
    "Kowalski",
    "Nowak",
    "Johansson",
    "Larsen",
    "Okafor",
    "Mensah",
    "Silva",
    "Santos",
    "Murphy",
    "Kelly",
    "Walsh",
    "Cohen",
    "Haddad",
    "Ali",
    "Singh",
    "Fischer",
];

/// (office, city, country, usageLocation, phone prefix)
const SITES: &[(&str, &str, &str, &str, &str)] = &[
    (
        "Redmond - Building 25",
        "Redmond",
        "United States",
        "US",
        "+1 425 555 ",
    ),
    (
        "New York - Hudson Yards",
        "New York",
        "United States",
        "US",
        "+1 212 555 ",
    ),
    (
        "London - Paddington",
        "London",
        "United Kingdom",
        "GB",
        "+44 20 7946 ",
    ),
    (
        "Dublin - Sir John Rogerson's Quay",
        "Dublin",
        "Ireland",
        "IE",
        "+353 1 555 ",
    ),
    ("Berlin - Mitte", "Berlin", "Germany", "DE", "+49 30 5557 "),
    ("Paris - La Défense", "Paris", "France", "FR", "+33 1 5555 "),
    (
        "Bengaluru - Whitefield",
        "Bengaluru",
        "India",
        "IN",
        "+91 80 5555 ",
    ),
    ("Tokyo - Marunouchi", "Tokyo", "Japan", "JP", "+81 3 5555 "),
    (
        "São Paulo - Avenida Paulista",
        "São Paulo",
        "Brazil",
        "BR",
        "+55 11 5555 ",
    ),
    (
        "Sydney - Barangaroo",
        "Sydney",
        "Australia",
        "AU",
        "+61 2 5550 ",
    ),
    (
        "Toronto - King Street",
        "Toronto",
        "Canada",
        "CA",
        "+1 416 555 ",
    ),
];

const DEPARTMENTS: &[(&str, &[&str])] = &[
    (
        "Engineering",
        &[
            "Software Engineer",
            "Senior Software Engineer",
            "Principal Software Engineer",
            "Site Reliability Engineer",
            "QA Engineer",
        ],
    ),
    (
        "Sales",
        &[
            "Account Executive",
            "Sales Development Representative",
            "Solutions Consultant",
            "Account Manager",
        ],
    ),
    (
        "Marketing",
        &[
            "Marketing Specialist",
            "Content Strategist",
            "Product Marketing Manager",
        ],
    ),
    (
        "Finance",
        &["Financial Analyst", "Accountant", "Payroll Specialist"],
    ),
    (
        "Human Resources",
        &[
            "HR Business Partner",
            "Recruiter",
            "Learning & Development Specialist",
        ],
    ),
    (
        "Customer Support",
        &[
            "Support Engineer",
            "Customer Success Manager",
            "Support Specialist",
        ],
    ),
    (
        "Operations",
        &[
            "Operations Analyst",
            "Facilities Coordinator",
            "Procurement Specialist",
        ],
    ),
    (
        "Legal",
        &["Corporate Counsel", "Paralegal", "Compliance Analyst"],
    ),
    (
        "Product Management",
        &["Product Manager", "Senior Product Manager", "UX Designer"],
    ),
    (
        "Information Technology",
        &[
            "Systems Administrator",
            "IT Support Technician",
            "Security Analyst",
        ],
    ),
];

/// (givenName, surname, displayName, UPN local part)
const SPECIAL_NAMES: &[(&str, &str, &str, &str)] = &[
    ("Zoë", "Ångström", "Zoë Ångström", "zoe.angstrom"),
    ("José", "Núñez", "José Núñez", "jose.nunez"),
    ("小龙", "李", "李 小龙", "xiaolong.li"),
    ("Siobhán", "O'Brien", "Siobhán O'Brien", "siobhan.o'brien"),
    ("Åsa", "Øvergård", "Åsa Øvergård", "asa.overgard"),
    ("Ngọc Anh", "Nguyễn", "Nguyễn Ngọc Anh", "ngocanh.nguyen"),
];

/// Exactly 200 characters.
const LONG_JOB_TITLE: &str = "Senior Principal Technical Program Manager, Global Identity Governance, Access Lifecycle Automation and Compliance Engineering for Cloud Infrastructure, Developer Platforms and Incident Response, EMEA";

fn seeded_guid(rng: &mut StdRng) -> String {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Vp,
    Director,
    Staff,
}

/// A deterministic tenant for tests, the demo and benches, built from a seed: group
/// "All Employees" (`all_group_id`) with `n` transitive member users, ~10% of them members only
/// through the nested group "Contractors" (itself a member of All Employees; one director is a
/// member of both), ~3% disabled, a manager chain CEO → VP → Director → staff where the CEO is
/// in no group (and has no manager) and every other user's manager is a direct member of All
/// Employees, one user without mail, unicode names, one UPN with an apostrophe
/// (`siobhan.o'brien@…`), one 200-character jobTitle, employeeIds on all but one user,
/// realistic departments/offices/cities/countries; ids are GUIDs derived from the seed.
pub fn fixture(n: usize, seed: u64) -> Fixture {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0fa1_1ee5);
    let all_group_id = seeded_guid(&mut rng);
    let nested_group_id = seeded_guid(&mut rng);
    let ceo_id = seeded_guid(&mut rng);

    let vps = if n == 0 {
        0
    } else {
        (n / 60).clamp(1, DEPARTMENTS.len())
    };
    let directors = (n / 15).max(usize::from(n > vps)).min(n - vps);
    let staff = n - vps - directors;
    let contractors = ((n as f64) * 0.10).round() as usize;
    let contractors = contractors.min(staff.saturating_sub(SPECIAL_NAMES.len() + 4));
    let disabled = ((n as f64) * 0.03).ceil() as usize;

    let mut used_upns: HashSet<String> = HashSet::new();
    let mut make_upn = |local: &str| -> String {
        let mut candidate = local.to_string();
        let mut k = 2;
        while !used_upns.insert(candidate.clone()) {
            candidate = format!("{local}{k}");
            k += 1;
        }
        format!("{candidate}@{FIXTURE_DOMAIN}")
    };

    let ceo = SimUser {
        id: ceo_id.clone(),
        user_principal_name: make_upn("margaret.whitfield"),
        mail: Some(format!("margaret.whitfield@{FIXTURE_DOMAIN}")),
        given_name: Some("Margaret".into()),
        surname: Some("Whitfield".into()),
        display_name: Some("Margaret Whitfield".into()),
        job_title: Some("Chief Executive Officer".into()),
        department: Some("Executive Office".into()),
        office_location: Some(SITES[0].0.into()),
        employee_id: Some("E000001".into()),
        employee_type: Some("Employee".into()),
        company_name: Some("Contoso Ltd".into()),
        city: Some(SITES[0].1.into()),
        country: Some(SITES[0].2.into()),
        usage_location: Some(SITES[0].3.into()),
        mobile_phone: Some("+1 425 555 0100".into()),
        business_phones: vec!["+1 425 555 0101".into()],
        account_enabled: true,
        manager_id: None,
    };

    let mut users: Vec<SimUser> = Vec::with_capacity(n + 1);
    let mut dept_of: Vec<usize> = Vec::with_capacity(n);
    let mut special_i = 0;
    let mut staff_seen = 0usize;
    for i in 0..n {
        let id = seeded_guid(&mut rng);
        let (role, manager_id, dept) = if i < vps {
            (Role::Vp, ceo_id.clone(), i % DEPARTMENTS.len())
        } else if i < vps + directors {
            let vp = (i - vps) % vps;
            (Role::Director, users[vp].id.clone(), dept_of[vp])
        } else {
            let k = i - vps - directors;
            let mgr = if directors > 0 {
                vps + k % directors
            } else {
                k % vps.max(1)
            };
            (Role::Staff, users[mgr].id.clone(), dept_of[mgr])
        };
        let site = if role == Role::Staff {
            rng.random_range(0..SITES.len())
        } else {
            i % SITES.len()
        };
        let (given, sur, display, local) = if role == Role::Staff && special_i < SPECIAL_NAMES.len()
        {
            let s = SPECIAL_NAMES[special_i];
            special_i += 1;
            (
                s.0.to_string(),
                s.1.to_string(),
                s.2.to_string(),
                s.3.to_string(),
            )
        } else {
            let g = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
            let l = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
            (
                g.to_string(),
                l.to_string(),
                format!("{g} {l}"),
                format!("{}.{}", g.to_lowercase(), l.to_lowercase()),
            )
        };
        let upn = make_upn(&local);
        let (dname, titles) = DEPARTMENTS[dept];
        let job_title = match role {
            Role::Vp => format!("Vice President, {dname}"),
            Role::Director => format!("Director, {dname}"),
            Role::Staff => titles[rng.random_range(0..titles.len())].to_string(),
        };
        let (office, city, country, usage, phone) = SITES[site];
        let business_phones = if rng.random_bool(0.8) {
            vec![format!("{phone}{:04}", rng.random_range(0..10_000))]
        } else {
            Vec::new()
        };
        let mobile_phone = rng
            .random_bool(0.5)
            .then(|| format!("{phone}{:04}", rng.random_range(0..10_000)));
        let staff_index = if role == Role::Staff {
            staff_seen += 1;
            Some(staff_seen - 1)
        } else {
            None
        };
        let contractor = staff_index.is_some_and(|k| k >= staff - contractors);
        users.push(SimUser {
            id,
            mail: Some(upn.clone()),
            user_principal_name: upn,
            given_name: Some(given),
            surname: Some(sur),
            display_name: Some(display),
            job_title: Some(job_title),
            department: Some(dname.to_string()),
            office_location: Some(office.to_string()),
            employee_id: Some(if contractor {
                format!("C{:05}", 10_000 + i)
            } else {
                format!("E{:06}", 100_000 + i)
            }),
            employee_type: Some(if contractor { "Contractor" } else { "Employee" }.to_string()),
            company_name: Some(
                if contractor {
                    "Fabrikam Staffing Services"
                } else {
                    "Contoso Ltd"
                }
                .to_string(),
            ),
            city: Some(city.to_string()),
            country: Some(country.to_string()),
            usage_location: Some(usage.to_string()),
            mobile_phone,
            business_phones,
            account_enabled: true,
            manager_id: Some(manager_id),
        });
        dept_of.push(dept);
    }

    // Special properties on the first staff members after the named ones (or whoever exists).
    let first_staff = vps + directors;
    let pick = |k: usize| -> Option<usize> {
        if n == 0 {
            None
        } else {
            Some((first_staff + SPECIAL_NAMES.len() + k).min(n - 1))
        }
    };
    if let Some(i) = pick(0) {
        users[i].mail = None;
    }
    if let Some(i) = pick(1) {
        users[i].job_title = Some(LONG_JOB_TITLE.to_string());
    }
    if let Some(i) = pick(2) {
        users[i].employee_id = None;
    }
    // Disabled accounts: spread over non-contractor staff (never the managers).
    let enabled_pool: Vec<usize> =
        (first_staff + SPECIAL_NAMES.len() + 3..n.saturating_sub(contractors)).collect();
    let mut pool = if enabled_pool.is_empty() {
        (first_staff..n).collect::<Vec<_>>()
    } else {
        enabled_pool
    };
    pool.shuffle(&mut rng);
    for &i in pool.iter().take(disabled) {
        users[i].account_enabled = false;
    }

    let contractor_ids: Vec<String> = users[n - contractors..n]
        .iter()
        .map(|u| u.id.clone())
        .collect();
    let mut all_members: Vec<String> = users[..n - contractors]
        .iter()
        .map(|u| u.id.clone())
        .collect();
    all_members.push(nested_group_id.clone());
    let mut nested_members = contractor_ids;
    if directors > 0 {
        // A contractor manager who is also a direct member: listed once.
        nested_members.insert(0, users[vps].id.clone());
    }
    users.insert(0, ceo);

    Fixture {
        tenant: Tenant {
            tenant_id: FIXTURE_TENANT_ID.to_string(),
            client_id: FIXTURE_CLIENT_ID.to_string(),
            client_secret: FIXTURE_CLIENT_SECRET.to_string(),
            users,
            groups: vec![
                SimGroup {
                    id: all_group_id.clone(),
                    display_name: "All Employees".into(),
                    members: all_members,
                },
                SimGroup {
                    id: nested_group_id.clone(),
                    display_name: "Contractors".into(),
                    members: nested_members,
                },
            ],
        },
        all_group_id,
        nested_group_id,
        ceo_id,
    }
}
