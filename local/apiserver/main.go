// Command ifw-test-apiserver is the ifw project's test control plane: the real
// apiextensions-apiserver (CRDs, custom resources, schemas, CEL, status,
// watch, server-side apply) plus etcd-backed storage for the built-in kinds
// the operator and the Helm chart use, with RBAC enforced for every identity
// but system:masters (rbac.go). There are no controllers: nothing schedules
// Pods, runs Jobs or collects garbage. Tests play those parts. Also
// `ifw-test-apiserver covers` (covers.go), Kubernetes' RBAC rule comparison
// for tests. Built by .ci/build-apiserver.sh from Debian's Go sources.
package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	extapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/authorization/path"
	"k8s.io/apiserver/pkg/authorization/union"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/names"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-base/cli"
	"sigs.k8s.io/structured-merge-diff/v6/fieldpath"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
)

// builtin describes one built-in resource served from etcd.
type builtin struct {
	gv         schema.GroupVersion
	resource   string
	singular   string
	kind       string
	namespaced bool
	status     bool // has a /status subresource
	short      []string
	fields     func(obj runtime.Object, set fields.Set) // extra field selectors
}

var (
	coreGV = corev1.SchemeGroupVersion
	// every resource this server stores besides CRDs and custom resources
	builtins = []builtin{
		{coreGV, "namespaces", "namespace", "Namespace", false, true, []string{"ns"}, func(o runtime.Object, s fields.Set) {
			s["status.phase"] = string(o.(*corev1.Namespace).Status.Phase)
		}},
		{coreGV, "pods", "pod", "Pod", true, true, []string{"po"}, func(o runtime.Object, s fields.Set) {
			p := o.(*corev1.Pod)
			s["spec.nodeName"] = p.Spec.NodeName
			s["spec.restartPolicy"] = string(p.Spec.RestartPolicy)
			s["spec.serviceAccountName"] = p.Spec.ServiceAccountName
			s["status.phase"] = string(p.Status.Phase)
		}},
		{coreGV, "events", "event", "Event", true, false, []string{"ev"}, func(o runtime.Object, s fields.Set) {
			e := o.(*corev1.Event)
			s["involvedObject.kind"] = e.InvolvedObject.Kind
			s["involvedObject.namespace"] = e.InvolvedObject.Namespace
			s["involvedObject.name"] = e.InvolvedObject.Name
			s["involvedObject.uid"] = string(e.InvolvedObject.UID)
			s["involvedObject.apiVersion"] = e.InvolvedObject.APIVersion
			s["involvedObject.resourceVersion"] = e.InvolvedObject.ResourceVersion
			s["involvedObject.fieldPath"] = e.InvolvedObject.FieldPath
			s["reason"] = e.Reason
			s["reportingComponent"] = e.ReportingController
			s["source"] = e.Source.Component
			s["type"] = e.Type
		}},
		{coreGV, "configmaps", "configmap", "ConfigMap", true, false, []string{"cm"}, nil},
		{coreGV, "secrets", "secret", "Secret", true, false, nil, func(o runtime.Object, s fields.Set) {
			s["type"] = string(o.(*corev1.Secret).Type)
		}},
		{coreGV, "services", "service", "Service", true, true, []string{"svc"}, nil},
		{coreGV, "serviceaccounts", "serviceaccount", "ServiceAccount", true, false, []string{"sa"}, nil},
		{coreGV, "persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim", true, true, []string{"pvc"}, nil},
		{batchv1.SchemeGroupVersion, "jobs", "job", "Job", true, true, nil, func(o runtime.Object, s fields.Set) {
			s["status.successful"] = strconv.Itoa(int(o.(*batchv1.Job).Status.Succeeded))
		}},
		{appsv1.SchemeGroupVersion, "deployments", "deployment", "Deployment", true, true, []string{"deploy"}, nil},
		{coordinationv1.SchemeGroupVersion, "leases", "lease", "Lease", true, false, nil, nil},
		{rbacv1.SchemeGroupVersion, "roles", "role", "Role", true, false, nil, nil},
		{rbacv1.SchemeGroupVersion, "rolebindings", "rolebinding", "RoleBinding", true, false, nil, nil},
		{rbacv1.SchemeGroupVersion, "clusterroles", "clusterrole", "ClusterRole", false, false, nil, nil},
		{rbacv1.SchemeGroupVersion, "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, false, nil, nil},
		{networkingv1.SchemeGroupVersion, "networkpolicies", "networkpolicy", "NetworkPolicy", true, false, []string{"netpol"}, nil},
		{networkingv1.SchemeGroupVersion, "ingresses", "ingress", "Ingress", true, true, []string{"ing"}, nil},
		{autoscalingv2.SchemeGroupVersion, "horizontalpodautoscalers", "horizontalpodautoscaler", "HorizontalPodAutoscaler", true, true, []string{"hpa"}, nil},
		{schedulingv1.SchemeGroupVersion, "priorityclasses", "priorityclass", "PriorityClass", false, false, []string{"pc"}, nil},
		{policyv1.SchemeGroupVersion, "poddisruptionbudgets", "poddisruptionbudget", "PodDisruptionBudget", true, true, []string{"pdb"}, nil},
		{eventsv1.SchemeGroupVersion, "events", "event", "Event", true, false, []string{"ev"}, nil},
	}

	// Scheme holds the external built-in types, each also registered as its
	// group's internal (hub) version: with no internal types, v1 is the hub.
	Scheme = runtime.NewScheme()
	Codecs = serializer.NewCodecFactory(Scheme)
	// namerScheme lists only the external kinds (for OpenAPI GVK extensions).
	namerScheme = runtime.NewScheme()
)

func init() {
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, batchv1.AddToScheme,
		appsv1.AddToScheme, coordinationv1.AddToScheme, rbacv1.AddToScheme, networkingv1.AddToScheme,
		policyv1.AddToScheme, eventsv1.AddToScheme, autoscalingv2.AddToScheme, schedulingv1.AddToScheme} {
		utilMust(add(Scheme))
		utilMust(add(namerScheme))
	}
	metav1.AddToGroupVersion(Scheme, schema.GroupVersion{Version: "v1"})
	Scheme.AddUnversionedTypes(schema.GroupVersion{Version: "v1"}, &metav1.Status{}, &metav1.APIVersions{},
		&metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
	for _, b := range builtins {
		hub := schema.GroupVersion{Group: b.gv.Group, Version: runtime.APIVersionInternal}
		obj, err := Scheme.New(b.gv.WithKind(b.kind))
		utilMust(err)
		list, err := Scheme.New(b.gv.WithKind(b.kind + "List"))
		utilMust(err)
		Scheme.AddKnownTypeWithName(hub.WithKind(b.kind), obj)
		Scheme.AddKnownTypeWithName(hub.WithKind(b.kind+"List"), list)
		b := b
		allowed := map[string]bool{"metadata.name": true, "metadata.namespace": true}
		if b.fields != nil {
			s := fields.Set{}
			b.fields(obj, s)
			for k := range s {
				allowed[k] = true
			}
		}
		utilMust(Scheme.AddFieldLabelConversionFunc(b.gv.WithKind(b.kind), func(label, value string) (string, string, error) {
			if !allowed[label] {
				return "", "", fmt.Errorf("field label not supported: %s", label)
			}
			return label, value, nil
		}))
	}
}

func utilMust(err error) {
	if err != nil {
		panic(err)
	}
}

// ---------------------------------------------------------------------------
// strategy: generation, status separation, a few defaults. No validation of
// built-in fields beyond object metadata (which the generic store checks).

type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	b        builtin
	isStatus bool // strategy for the /status subresource
}

func (s strategy) NamespaceScoped() bool { return s.b.namespaced }

func structField(obj runtime.Object, name string) reflect.Value {
	v := reflect.ValueOf(obj)
	if v.Kind() == reflect.Ptr {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return reflect.Value{}
	}
	return v.FieldByName(name)
}

func (s strategy) PrepareForCreate(ctx context.Context, obj runtime.Object) {
	m, _ := meta.Accessor(obj)
	if structField(obj, "Spec").IsValid() {
		m.SetGeneration(1)
	}
	if st := structField(obj, "Status"); s.b.status && st.IsValid() {
		st.Set(reflect.Zero(st.Type())) // status is written through /status only
	}
	switch o := obj.(type) {
	case *corev1.Pod:
		o.Status.Phase = corev1.PodPending
		if o.Spec.RestartPolicy == "" {
			o.Spec.RestartPolicy = corev1.RestartPolicyAlways
		}
	case *corev1.Namespace:
		o.Status.Phase = corev1.NamespaceActive
		if o.Labels == nil {
			o.Labels = map[string]string{}
		}
		o.Labels[corev1.LabelMetadataName] = o.Name
	case *corev1.Service:
		if o.Spec.Type == "" {
			o.Spec.Type = corev1.ServiceTypeClusterIP
		}
	case *corev1.Secret:
		if o.Type == "" {
			o.Type = corev1.SecretTypeOpaque
		}
	}
	normalize(obj)
}

// normalize does what kube-apiserver's v1 -> internal conversion does.
func normalize(obj runtime.Object) {
	if sec, ok := obj.(*corev1.Secret); ok && len(sec.StringData) > 0 {
		if sec.Data == nil {
			sec.Data = map[string][]byte{}
		}
		for k, v := range sec.StringData {
			sec.Data[k] = []byte(v)
		}
		sec.StringData = nil
	}
}

func (s strategy) PrepareForUpdate(ctx context.Context, obj, old runtime.Object) {
	m, _ := meta.Accessor(obj)
	om, _ := meta.Accessor(old)
	if s.isStatus {
		// keep everything but status (and resourceVersion etc.) from the stored object
		metav1.ResetObjectMetaForStatus(m, om)
		nv, ov := reflect.ValueOf(obj).Elem(), reflect.ValueOf(old).Elem()
		for i := 0; i < nv.NumField(); i++ {
			switch nv.Type().Field(i).Name {
			case "TypeMeta", "ObjectMeta", "Status":
			default:
				nv.Field(i).Set(ov.Field(i))
			}
		}
		return
	}
	if st := structField(obj, "Status"); s.b.status && st.IsValid() {
		st.Set(structField(old, "Status"))
	}
	normalize(obj)
	m.SetGeneration(om.GetGeneration())
	if spec := structField(obj, "Spec"); spec.IsValid() &&
		!equality.Semantic.DeepEqual(spec.Interface(), structField(old, "Spec").Interface()) {
		m.SetGeneration(om.GetGeneration() + 1)
	}
	if ns, ok := obj.(*corev1.Namespace); ok {
		if ns.Labels == nil {
			ns.Labels = map[string]string{}
		}
		ns.Labels[corev1.LabelMetadataName] = ns.Name
	}
}

func (s strategy) Validate(ctx context.Context, obj runtime.Object) field.ErrorList { return nil }
func (s strategy) ValidateUpdate(ctx context.Context, obj, old runtime.Object) field.ErrorList {
	return nil
}
func (s strategy) WarningsOnCreate(ctx context.Context, obj runtime.Object) []string { return nil }
func (s strategy) WarningsOnUpdate(ctx context.Context, obj, old runtime.Object) []string {
	return nil
}
func (s strategy) Canonicalize(obj runtime.Object) {}
func (s strategy) AllowCreateOnUpdate() bool       { return false }
func (s strategy) AllowUnconditionalUpdate() bool  { return true }

func (s strategy) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	set := fieldpath.NewSet()
	if s.isStatus {
		set.Insert(fieldpath.MakePathOrDie("metadata"))
		if s.b.kind != "Namespace" { // namespaces have spec but it is set via /finalize
			set.Insert(fieldpath.MakePathOrDie("spec"))
		}
	} else if s.b.status {
		set.Insert(fieldpath.MakePathOrDie("status"))
	}
	return map[fieldpath.APIVersion]*fieldpath.Set{fieldpath.APIVersion(s.b.gv.String()): set}
}

// ---------------------------------------------------------------------------
// REST storage

type mainREST struct {
	*genericregistry.Store
	short []string
}

func (r *mainREST) ShortNames() []string { return r.short }

// Categories puts the workload kinds in "all" (kubectl get all), as upstream.
func (r *mainREST) Categories() []string {
	switch r.DefaultQualifiedResource.Resource {
	case "pods", "services", "deployments", "jobs", "horizontalpodautoscalers":
		return []string{"all"}
	}
	return nil
}

type statusREST struct{ store *genericregistry.Store }

func (r *statusREST) New() runtime.Object { return r.store.New() }
func (r *statusREST) Destroy()            {}
func (r *statusREST) Get(ctx context.Context, name string, o *metav1.GetOptions) (runtime.Object, error) {
	return r.store.Get(ctx, name, o)
}
func (r *statusREST) Update(ctx context.Context, name string, objInfo rest.UpdatedObjectInfo,
	cv rest.ValidateObjectFunc, uv rest.ValidateObjectUpdateFunc, _ bool, o *metav1.UpdateOptions) (runtime.Object, bool, error) {
	return r.store.Update(ctx, name, objInfo, cv, uv, false, o)
}
func (r *statusREST) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	return r.store.GetResetFields()
}
func (r *statusREST) ConvertToTable(ctx context.Context, obj runtime.Object, t runtime.Object) (*metav1.Table, error) {
	return r.store.ConvertToTable(ctx, obj, t)
}

func newStorage(b builtin, getter generic.RESTOptionsGetter) (map[string]rest.Storage, error) {
	gr := b.gv.WithResource(b.resource).GroupResource()
	newObj := func() runtime.Object { o, _ := Scheme.New(b.gv.WithKind(b.kind)); return o }
	newList := func() runtime.Object { o, _ := Scheme.New(b.gv.WithKind(b.kind + "List")); return o }
	st := strategy{ObjectTyper: Scheme, NameGenerator: names.SimpleNameGenerator, b: b}
	store := &genericregistry.Store{
		NewFunc:                   newObj,
		NewListFunc:               newList,
		DefaultQualifiedResource:  gr,
		SingularQualifiedResource: schema.GroupResource{Group: b.gv.Group, Resource: b.singular},
		CreateStrategy:            st,
		UpdateStrategy:            st,
		DeleteStrategy:            st,
		ResetFieldsStrategy:       st,
		TableConvertor:            rest.NewDefaultTableConvertor(gr),
	}
	attrs := func(obj runtime.Object) (labels.Set, fields.Set, error) {
		m, err := meta.Accessor(obj)
		if err != nil {
			return nil, nil, err
		}
		fs := fields.Set{"metadata.name": m.GetName()}
		if b.namespaced {
			fs["metadata.namespace"] = m.GetNamespace()
		}
		if b.fields != nil {
			b.fields(obj, fs)
		}
		return labels.Set(m.GetLabels()), fs, nil
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: getter, AttrFunc: attrs}); err != nil {
		return nil, fmt.Errorf("%s: %w", gr, err)
	}
	out := map[string]rest.Storage{b.resource: &mainREST{Store: store, short: b.short}}
	if b.status {
		ss := *store
		sst := st
		sst.isStatus = true
		ss.UpdateStrategy, ss.ResetFieldsStrategy = sst, sst
		ss.CreateStrategy = nil
		ss.DeleteStrategy = nil
		out[b.resource+"/status"] = &statusREST{store: &ss}
	}
	return out, nil
}

// installBuiltins serves every builtin in the given generic server.
func installBuiltins(s *genericapiserver.GenericAPIServer, etcd genericoptions.EtcdOptions) error {
	sc := etcd.StorageConfig
	sc.Codec = Codecs.LegacyCodec(Scheme.PrioritizedVersionsAllGroups()...)
	etcd.WatchCacheSizes = nil
	getter := etcd.CreateRESTOptionsGetter(&genericoptions.SimpleStorageFactory{StorageConfig: sc}, nil)

	groups := map[string]*genericapiserver.APIGroupInfo{}
	var order []string
	for _, b := range builtins {
		info, ok := groups[b.gv.Group]
		if !ok {
			i := genericapiserver.NewDefaultAPIGroupInfo(b.gv.Group, Scheme, runtime.NewParameterCodec(Scheme), Codecs)
			i.PrioritizedVersions = []schema.GroupVersion{b.gv}
			info = &i
			groups[b.gv.Group] = info
			order = append(order, b.gv.Group)
		}
		st, err := newStorage(b, getter)
		if err != nil {
			return err
		}
		if info.VersionedResourcesStorageMap[b.gv.Version] == nil {
			info.VersionedResourcesStorageMap[b.gv.Version] = map[string]rest.Storage{}
		}
		for k, v := range st {
			info.VersionedResourcesStorageMap[b.gv.Version][k] = v
		}
	}
	if err := s.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, groups[""]); err != nil {
		return fmt.Errorf("installing core/v1: %w", err)
	}
	var rest []*genericapiserver.APIGroupInfo
	for _, g := range order {
		if g != "" {
			rest = append(rest, groups[g])
		}
	}
	if err := s.InstallAPIGroups(rest...); err != nil {
		return fmt.Errorf("installing built-in groups: %w", err)
	}
	return nil
}

// ---------------------------------------------------------------------------
// discovery: standalone apiextensions-apiserver turns /apis off; we turn it on
// and list the groups of Established CRDs there (kube-apiserver's aggregator
// does this through APIServices).

func mirrorCRDGroups(s *extapiserver.CustomResourceDefinitions) {
	inf := s.Informers.Apiextensions().V1().CustomResourceDefinitions()
	mine := map[string]bool{}
	builtinGroup := map[string]bool{"apiextensions.k8s.io": true}
	for _, b := range builtins {
		builtinGroup[b.gv.Group] = true
	}
	recompute := func() {
		crds, err := inf.Lister().List(labels.Everything())
		if err != nil {
			return
		}
		versions := map[string]map[string]bool{}
		for _, crd := range crds {
			if !isEstablished(crd) || builtinGroup[crd.Spec.Group] {
				continue
			}
			for _, v := range crd.Spec.Versions {
				if v.Served {
					if versions[crd.Spec.Group] == nil {
						versions[crd.Spec.Group] = map[string]bool{}
					}
					versions[crd.Spec.Group][v.Name] = true
				}
			}
		}
		for g, vs := range versions {
			var names []string
			for v := range vs {
				names = append(names, v)
			}
			sort.Slice(names, func(i, j int) bool { return version.CompareKubeAwareVersionStrings(names[i], names[j]) > 0 })
			group := metav1.APIGroup{Name: g}
			for _, v := range names {
				group.Versions = append(group.Versions, metav1.GroupVersionForDiscovery{GroupVersion: g + "/" + v, Version: v})
			}
			group.PreferredVersion = group.Versions[0]
			s.GenericAPIServer.DiscoveryGroupManager.AddGroup(group)
			mine[g] = true
		}
		for g := range mine {
			if versions[g] == nil {
				s.GenericAPIServer.DiscoveryGroupManager.RemoveGroup(g)
				delete(mine, g)
			}
		}
	}
	var mu sync.Mutex
	resync := func(interface{}) { mu.Lock(); defer mu.Unlock(); recompute() }
	inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    resync,
		UpdateFunc: func(_, n interface{}) { resync(n) },
		DeleteFunc: resync,
	})
}

func isEstablished(crd *apiextv1.CustomResourceDefinition) bool {
	for _, c := range crd.Status.Conditions {
		if c.Type == apiextv1.Established && c.Status == apiextv1.ConditionTrue {
			return true
		}
	}
	return false
}

// ---------------------------------------------------------------------------

func run(ctx context.Context, o *options.CustomResourceDefinitionsServerOptions) error {
	config, err := o.Config()
	if err != nil {
		return err
	}
	defs := openAPIDefinitions()
	namer := openAPINamer()
	config.GenericConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(defs, namer)
	config.GenericConfig.OpenAPIConfig.Info.Title = "ifw-test-apiserver"
	config.GenericConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(defs, namer)
	config.GenericConfig.OpenAPIV3Config.Info.Title = "ifw-test-apiserver"

	// Authorization as kube-apiserver's --authorization-mode=RBAC: system:masters
	// may do anything, health checks are open, everyone else gets what RBAC
	// objects grant (instead of the delegating authorizer, which would ask
	// this very server for SubjectAccessReviews it does not serve).
	health, err := path.NewAuthorizer([]string{"/healthz", "/readyz", "/livez"})
	if err != nil {
		return err
	}
	rbac := &rbacAuthorizer{}
	config.GenericConfig.Authorization.Authorizer = union.New(
		authorizerfactory.NewPrivilegedGroups(user.SystemPrivilegedGroup), health, rbac)

	// Debian ships go-restful 3.10, whose routes do not match a trailing
	// slash ("/version/", which the Python client asks for, would 404);
	// Kubernetes builds with a go-restful that accepts both.
	chain := config.GenericConfig.BuildHandlerChainFunc
	config.GenericConfig.BuildHandlerChainFunc = func(h http.Handler, c *genericapiserver.Config) http.Handler {
		return trimTrailingSlash(chain(h, c))
	}

	completed := config.Complete()
	completed.GenericConfig.EnableDiscovery = true
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	if err := installBuiltins(server.GenericAPIServer, *o.RecommendedOptions.Etcd); err != nil {
		return err
	}
	mirrorCRDGroups(server)
	server.GenericAPIServer.AddPostStartHookOrDie("ifw-rbac-caches", func(hc genericapiserver.PostStartHookContext) error {
		return rbac.start(hc.Context, hc.LoopbackClientConfig)
	})
	server.GenericAPIServer.AddPostStartHookOrDie("ifw-bootstrap-namespaces", func(hc genericapiserver.PostStartHookContext) error {
		client, err := kubernetes.NewForConfig(hc.LoopbackClientConfig)
		if err != nil {
			return err
		}
		for _, ns := range []string{metav1.NamespaceDefault, metav1.NamespaceSystem, metav1.NamespacePublic, corev1.NamespaceNodeLease} {
			for {
				_, err := client.CoreV1().Namespaces().Create(hc.Context, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
				if err == nil || apierrors.IsAlreadyExists(err) {
					break
				}
				select {
				case <-hc.Done():
					return err
				case <-time.After(100 * time.Millisecond):
				}
			}
		}
		return nil
	})
	return server.GenericAPIServer.PrepareRun().RunWithContext(ctx)
}

func trimTrailingSlash(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := r.URL.Path; len(p) > 1 && strings.HasSuffix(p, "/") {
			u := *r.URL
			u.Path = strings.TrimRight(p, "/")
			u.RawPath = strings.TrimRight(u.RawPath, "/")
			if u.Path == "" {
				u.Path = "/"
			}
			r2 := r.Clone(r.Context())
			r2.URL = &u
			r2.RequestURI = u.RequestURI()
			r = r2
		}
		h.ServeHTTP(w, r)
	})
}

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	cmd := &cobra.Command{
		Use:   "ifw-test-apiserver",
		Short: "apiextensions-apiserver + built-in kinds on etcd, for tests",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, args []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return run(c.Context(), o)
		},
	}
	cmd.AddCommand(coversCommand())
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}
